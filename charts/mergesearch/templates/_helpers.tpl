{{/* Names, labels and images shared by the templates. */}}

{{- define "mergesearch.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mergesearch.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "mergesearch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mergesearch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mergesearch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{ include "mergesearch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mergesearch
{{- end }}

{{- define "mergesearch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mergesearch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "mergesearch.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* Resources the operator reads cluster-wide even when it serves listed namespaces: a Role
cannot grant them, so they stay in a ClusterRole. */}}
{{- define "mergesearch.clusterScopedResources" -}}
customresourcedefinitions namespaces
{{- end }}

{{/* The namespaces the operator serves (space-separated), unless clusterWide. */}}
{{- define "mergesearch.namespaces" -}}
{{- if .Values.watchNamespaces }}
{{- join " " .Values.watchNamespaces }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/* The ServiceAccount trial pods run under (the operator's MERGESEARCH_TRIAL_SERVICE_ACCOUNT). */}}
{{- define "mergesearch.trialServiceAccount" -}}
{{- if .Values.clusterWide }}
{{- "default" }}
{{- else }}
{{- .Values.trialServiceAccount.name }}
{{- end }}
{{- end }}
