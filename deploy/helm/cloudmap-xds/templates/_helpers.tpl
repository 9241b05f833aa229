{{/* Chart name, or nameOverride. */}}
{{- define "cloudmap-xds.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of every object. A release named cloudmap-xds (the documented `helm install cloudmap-xds ...`) gives
cloudmap-xds, the Service istiod dials: xds://cloudmap-xds.<namespace>.svc:15099.
*/}}
{{- define "cloudmap-xds.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The headless Service of the peer bootstrap: <fullname>-peers, within 63 characters. */}}
{{- define "cloudmap-xds.peersName" -}}
{{- printf "%s-peers" (include "cloudmap-xds.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* Labels that select our pods (Deployment, Service, PDB, NetworkPolicy, spread). Never change them: a
Deployment's selector is immutable. */}}
{{- define "cloudmap-xds.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cloudmap-xds.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cloudmap-xds.labels" -}}
{{ include "cloudmap-xds.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cloudmap-xds.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cloudmap-xds.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cloudmap-xds.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
A label selector from a map of labels, written as matchExpressions (one `In` per label), the same form as the
kustomize base uses (there, because kustomize adds its own label to every podSelector.matchLabels of a
NetworkPolicy). An empty map gives {}: everything.
*/}}
{{- define "cloudmap-xds.selectorFromLabels" -}}
{{- if . -}}
matchExpressions:
{{- range $key, $value := . }}
- key: {{ $key }}
  operator: In
  values:
  - {{ $value | quote }}
{{- end }}
{{- else -}}
{}
{{- end }}
{{- end }}

{{- define "cloudmap-xds.prometheusAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.ports.admin | quote }}
prometheus.io/path: /metrics
{{- end }}
