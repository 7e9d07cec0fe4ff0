{{/*
Names. Cluster-scoped objects carry the full name so two releases (e.g. a canary in another
namespace) do not collide.
*/}}
{{- define "resultstore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "resultstore.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "resultstore.operatorName" -}}
{{- printf "%s-operator" (include "resultstore.fullname" .) }}
{{- end }}

{{- define "resultstore.webhookName" -}}
{{- printf "%s-webhook" (include "resultstore.fullname" .) }}
{{- end }}

{{- define "resultstore.injectorName" -}}
{{- printf "%s-injector" (include "resultstore.fullname" .) }}
{{- end }}

{{- define "resultstore.webhookTlsSecret" -}}
{{- printf "%s-webhook-tls" (include "resultstore.fullname" .) }}
{{- end }}

{{- define "resultstore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "resultstore.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "resultstore.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "resultstore.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "resultstore.selectorLabels" . }}
app.kubernetes.io/part-of: celery-resultstore
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "resultstore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "resultstore.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "resultstore.certManager" -}}
{{- if and .Values.webhook.enabled (eq .Values.webhook.tls.mode "certManager") }}true{{ end }}
{{- end }}

{{/* Namespaces the webhook never mutates, sorted like the operator's builder sorts them. */}}
{{- define "resultstore.excludedNamespaces" -}}
{{- uniq (concat (list "kube-system" .Release.Namespace) .Values.webhook.excludeNamespaces) | sortAlpha | toJson }}
{{- end }}
