{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "kura.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name prefix of every resource of the release. */}}
{{- define "kura.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of the headless Service (the StatefulSet's serviceName; pod DNS subdomain). */}}
{{- define "kura.headlessName" -}}
{{- printf "%s-headless" (include "kura.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* chart label value: name-version. */}}
{{- define "kura.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select this release's pods. Never change them: StatefulSet selectors are immutable. */}}
{{- define "kura.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kura.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every resource. */}}
{{- define "kura.labels" -}}
helm.sh/chart: {{ include "kura.chart" . }}
{{ include "kura.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kura
{{- end -}}

{{/* ServiceAccount the pods run as. */}}
{{- define "kura.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kura.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image reference; the tag defaults to the chart's appVersion. */}}
{{- define "kura.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Scheme of the internal peer URLs: https with peer mTLS. */}}
{{- define "kura.internalScheme" -}}
{{- if .Values.tls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* ConfigMap that holds the Lua extension script. */}}
{{- define "kura.extensionConfigMapName" -}}
{{- default (printf "%s-extension" (include "kura.fullname" .)) .Values.extension.existingConfigMap -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: explicit, or drain timeout + preStop sleep + 30 s margin. */}}
{{- define "kura.terminationGracePeriodSeconds" -}}
{{- if .Values.drain.terminationGracePeriodSeconds -}}
{{- .Values.drain.terminationGracePeriodSeconds | int -}}
{{- else -}}
{{- $drain := divf (.Values.kura.drainCompletionTimeoutMs | float64) 1000 | ceil | int -}}
{{- add $drain (.Values.drain.preStopSleepSeconds | int) 30 -}}
{{- end -}}
{{- end -}}

{{/* Fail the render on inconsistent values instead of deploying a node that refuses to start. */}}
{{- define "kura.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled requires tls.secretName (a Secret with the CA, certificate and key)" -}}
{{- end -}}
{{- if and .Values.extension.enabled (not .Values.extension.script) (not .Values.extension.existingConfigMap) -}}
{{- fail "extension.enabled requires extension.script or extension.existingConfigMap" -}}
{{- end -}}
{{- if not .Values.kura.tenantId -}}
{{- fail "kura.tenantId must not be empty" -}}
{{- end -}}
{{- $drainSeconds := divf (.Values.kura.drainCompletionTimeoutMs | float64) 1000 -}}
{{- $grace := include "kura.terminationGracePeriodSeconds" . | float64 -}}
{{- if le $grace (addf $drainSeconds (.Values.drain.preStopSleepSeconds | float64)) -}}
{{- fail "drain.terminationGracePeriodSeconds must exceed kura.drainCompletionTimeoutMs / 1000 + drain.preStopSleepSeconds" -}}
{{- end -}}
{{- end -}}
