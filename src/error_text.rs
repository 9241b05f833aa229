//! Errors worded for one log line, status field or exit message.

/// An error and its sources on one line, `outer: inner: ...`: what a user reads in a
/// status or an exit message (the SDK's `DisplayErrorContext` appends a debug dump, and
/// tonic's transport errors say little on their own).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        // Some errors repeat their source in their own message.
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ").split_whitespace().collect::<Vec<_>>().join(" ")
}
