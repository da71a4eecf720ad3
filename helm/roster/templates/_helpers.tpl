{{- define "roster.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "roster.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "roster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "roster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "roster.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The Secret holding DATABASE_URL (the chart's own unless existingSecret is set). */}}
{{- define "roster.databaseSecret" -}}
{{- .Values.database.existingSecret | default (include "roster.fullname" .) -}}
{{- end -}}

{{- define "roster.encryptionSecret" -}}
{{- .Values.encryption.existingSecret | default (include "roster.fullname" .) -}}
{{- end -}}

{{/* Environment every Roster container gets: the database URL and encryption keys. */}}
{{- define "roster.secretEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "roster.databaseSecret" . }}
      key: {{ if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}DATABASE_URL{{ end }}
{{- if or .Values.encryption.keys .Values.encryption.existingSecret }}
- name: ROSTER_ENCRYPTION_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "roster.encryptionSecret" . }}
      key: {{ if .Values.encryption.existingSecret }}{{ .Values.encryption.existingSecretKey }}{{ else }}ROSTER_ENCRYPTION_KEYS{{ end }}
{{- end }}
{{- end -}}

{{/*
The port the gRPC probes use: the plaintext health-only port when the gRPC port speaks TLS.
*/}}
{{- define "roster.probePort" -}}
{{- if .Values.tls.enabled }}{{ .Values.tls.healthPort }}{{ else }}{{ .Values.service.port }}{{ end }}
{{- end }}

{{/*
The events webhook's pods: labels apart from the server's, so the Service (which selects
roster.selectorLabels) never sends gRPC calls to them.
*/}}
{{- define "roster.webhookSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-events-webhook
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
