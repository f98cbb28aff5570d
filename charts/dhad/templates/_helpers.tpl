{{/* The release's full name: the release name, or <release>-dhad when it does not contain "dhad". */}}
{{- define "dhad.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dhad.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "dhad.labels" -}}
{{ include "dhad.selectorLabels" . }}
{{ include "dhad.commonLabels" . }}
{{- end -}}

{{/* Labels of every object, without the component (the trainer's ServiceAccount sets its own). */}}
{{- define "dhad.commonLabels" -}}
app.kubernetes.io/part-of: dhad
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dhad.serviceAccountName" -}}
{{- default (include "dhad.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "dhad.leaseName" -}}
{{- default (include "dhad.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "dhad.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dhad.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}
