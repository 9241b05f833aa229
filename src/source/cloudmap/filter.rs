//! Which namespaces and services are read: include/exclude lists of names or globs.
//!
//! Patterns use `*` (any run of characters, possibly empty) and `?` (exactly one
//! character); everything else matches itself, case-sensitively, as Cloud Map names are.
//! A service pattern with a `/` matches `namespace/service`; one without matches the
//! service name in every namespace. An empty include list includes everything;
//! an exclude always wins over an include.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{flag}: empty pattern")]
    Empty { flag: &'static str },
    #[error("{flag}: pattern {pattern:?} has more than one '/' (want SERVICE or NAMESPACE/SERVICE)")]
    TooManySlashes { flag: &'static str, pattern: String },
    #[error("{flag}: pattern {pattern:?} contains '/', which a namespace name cannot")]
    SlashInNamespace { flag: &'static str, pattern: String },
}

/// One glob pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(Vec<char>);

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Glob(pattern.chars().collect())
    }

    /// Iterative wildcard matching with single-star backtracking: O(len(text) × len(pattern)) at worst.
    pub fn matches(&self, text: &str) -> bool {
        let pattern = &self.0;
        let text: Vec<char> = text.chars().collect();
        let (mut p, mut t) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match pattern.get(p) {
                Some('*') => {
                    star = Some((p, t));
                    p += 1;
                }
                Some(&c) if c == '?' || c == text[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        pattern[p..].iter().all(|&c| c == '*')
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ServicePattern {
    Name(Glob),
    Qualified(Glob, Glob),
}

impl ServicePattern {
    fn matches(&self, namespace: &str, service: &str) -> bool {
        match self {
            ServicePattern::Name(s) => s.matches(service),
            ServicePattern::Qualified(n, s) => n.matches(namespace) && s.matches(service),
        }
    }
}

/// The four lists, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameFilter {
    include_namespaces: Vec<Glob>,
    exclude_namespaces: Vec<Glob>,
    include_services: Vec<ServicePattern>,
    exclude_services: Vec<ServicePattern>,
}

/// The raw lists as given on the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Patterns<'a> {
    pub include_namespaces: &'a [String],
    pub exclude_namespaces: &'a [String],
    pub include_services: &'a [String],
    pub exclude_services: &'a [String],
}

fn namespace_globs(flag: &'static str, patterns: &[String]) -> Result<Vec<Glob>, Error> {
    patterns
        .iter()
        .map(|p| {
            let p = p.trim();
            if p.is_empty() {
                Err(Error::Empty { flag })
            } else if p.contains('/') {
                Err(Error::SlashInNamespace { flag, pattern: p.to_owned() })
            } else {
                Ok(Glob::new(p))
            }
        })
        .collect()
}

fn service_patterns(flag: &'static str, patterns: &[String]) -> Result<Vec<ServicePattern>, Error> {
    patterns
        .iter()
        .map(|p| {
            let p = p.trim();
            let parts: Vec<&str> = p.split('/').collect();
            match parts.as_slice() {
                _ if p.is_empty() => Err(Error::Empty { flag }),
                [name] => Ok(ServicePattern::Name(Glob::new(name))),
                [ns, name] if !ns.is_empty() && !name.is_empty() => {
                    Ok(ServicePattern::Qualified(Glob::new(ns), Glob::new(name)))
                }
                [_, _] => Err(Error::Empty { flag }),
                _ => Err(Error::TooManySlashes { flag, pattern: p.to_owned() }),
            }
        })
        .collect()
}

impl NameFilter {
    pub fn new(patterns: Patterns<'_>) -> Result<Self, Error> {
        Ok(NameFilter {
            include_namespaces: namespace_globs("--include-namespaces", patterns.include_namespaces)?,
            exclude_namespaces: namespace_globs("--exclude-namespaces", patterns.exclude_namespaces)?,
            include_services: service_patterns("--include-services", patterns.include_services)?,
            exclude_services: service_patterns("--exclude-services", patterns.exclude_services)?,
        })
    }

    /// Whether a namespace is read at all (excluded namespaces cost no ListServices call).
    pub fn namespace(&self, name: &str) -> bool {
        (self.include_namespaces.is_empty() || self.include_namespaces.iter().any(|g| g.matches(name)))
            && !self.exclude_namespaces.iter().any(|g| g.matches(name))
    }

    /// Whether a service of an included namespace is read.
    pub fn service(&self, namespace: &str, service: &str) -> bool {
        (self.include_services.is_empty()
            || self.include_services.iter().any(|p| p.matches(namespace, service)))
            && !self.exclude_services.iter().any(|p| p.matches(namespace, service))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn globs_match_like_shells() {
        let cases = [
            ("my-namespace", "my-namespace", true),
            ("my-*", "my-namespace", true),
            ("my-*", "my-", true),
            ("*-namespace", "my-namespace", true),
            ("*", "", true),
            ("m?-n*e", "my-namespace", true),
            ("my-?", "my-ns", false),
            ("*a*b*c", "xaxxbxxc", true),
            ("*a*b*c", "xaxxbxxcx", false),
            ("prod", "production", false),
            ("Prod", "prod", false),
            ("é*", "émile", true),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(Glob::new(pattern).matches(text), want, "{pattern:?} vs {text:?}");
        }
    }

    #[test]
    fn include_and_exclude_combine() {
        let (inc_ns, exc_ns, inc_svc, exc_svc) = (
            strings(&["prod-*", "shared"]),
            strings(&["prod-legacy"]),
            strings(&[]),
            strings(&["*-canary", "shared/db"]),
        );
        let f = NameFilter::new(Patterns {
            include_namespaces: &inc_ns,
            exclude_namespaces: &exc_ns,
            include_services: &inc_svc,
            exclude_services: &exc_svc,
        })
        .unwrap();
        assert!(f.namespace("prod-eu"));
        assert!(f.namespace("shared"));
        assert!(!f.namespace("prod-legacy"), "exclude wins");
        assert!(!f.namespace("dev"), "not included");
        assert!(f.service("prod-eu", "api"));
        assert!(!f.service("prod-eu", "api-canary"));
        assert!(!f.service("shared", "db"), "qualified exclude");
        assert!(f.service("prod-eu", "db"), "qualified exclude is namespace-specific");
    }

    #[test]
    fn empty_filter_includes_everything() {
        let f = NameFilter::default();
        assert!(f.namespace("anything") && f.service("anything", "at-all"));
        let inc = strings(&["ns-a/*"]);
        let f = NameFilter::new(Patterns { include_services: &inc, ..Patterns::default() }).unwrap();
        assert!(f.service("ns-a", "x") && !f.service("ns-b", "x"));
    }

    #[test]
    fn bad_patterns_name_their_flag() {
        let bad = strings(&["a/b/c"]);
        let err = NameFilter::new(Patterns { include_services: &bad, ..Patterns::default() }).unwrap_err();
        assert!(err.to_string().starts_with("--include-services: pattern \"a/b/c\""), "{err}");
        let bad = strings(&["ns/x"]);
        let err = NameFilter::new(Patterns { exclude_namespaces: &bad, ..Patterns::default() }).unwrap_err();
        assert!(err.to_string().contains("--exclude-namespaces"), "{err}");
        let bad = strings(&[" "]);
        assert!(NameFilter::new(Patterns { include_namespaces: &bad, ..Patterns::default() }).is_err());
        let bad = strings(&["/svc"]);
        assert!(NameFilter::new(Patterns { exclude_services: &bad, ..Patterns::default() }).is_err());
    }
}
