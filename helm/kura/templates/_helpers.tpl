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

{{/* DNS name of the headless Service as the pods see it; pod N is <fullname>-N.<this>. */}}
{{- define "kura.podDomain" -}}
{{- printf "%s.$(POD_NAMESPACE).svc.%s" (include "kura.headlessName" .) .Values.clusterDomain -}}
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
{{- ternary "https" "http" .Values.peerTls.enabled -}}
{{- end -}}

{{/* Where the peer TLS Secret is mounted (Kura's path). */}}
{{- define "kura.peerTlsDir" -}}
/etc/kura/peer-tls
{{- end -}}

{{/* Secret with the peer CA, certificate and key; Kura's default name when unset. */}}
{{- define "kura.peerTlsSecretName" -}}
{{- default (printf "%s-peer-tls" (include "kura.fullname" .)) .Values.peerTls.secretName -}}
{{- end -}}

{{/*
KURA_PEERS: every ordinal's node URL, as Kura seeds it (a node skips its own), then
config.extraSeedPeers. DNS discovery finds pods beyond replicaCount.
*/}}
{{- define "kura.seedPeers" -}}
{{- $full := include "kura.fullname" . -}}
{{- $domain := include "kura.podDomain" . -}}
{{- $scheme := include "kura.internalScheme" . -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.replicaCount) -}}
{{- $peers = append $peers (printf "%s://%s-%d.%s:%d" $scheme $full $i $domain (int $.Values.peerTls.internalPort)) -}}
{{- end -}}
{{- join "," (concat $peers .Values.config.extraSeedPeers) -}}
{{- end -}}

{{/* ConfigMap that holds the Lua extension script. */}}
{{- define "kura.extensionConfigMapName" -}}
{{- default (printf "%s-extension" (include "kura.fullname" .)) .Values.extension.existingConfigMap -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: the node's drain deadline plus the preStop delay and a margin (Kura's formula). */}}
{{- define "kura.terminationGracePeriodSeconds" -}}
{{- $drain := div (add (int64 .Values.config.shutdown.drainCompletionTimeoutMs) 999) 1000 -}}
{{- add $drain (int .Values.podLifecycle.preStopDelaySeconds) (int .Values.podLifecycle.terminationGraceExtraSeconds) -}}
{{- end -}}

{{/*
The tunable KURA_* variables, one EnvVar each, sorted by name; a null value keeps the
node's default. This table is the one place a config.* key meets its variable.
*/}}
{{- define "kura.configEnv" -}}
{{- $c := .Values.config -}}
{{- $settings := dict
    "KURA_LOG_LEVEL" $c.logLevel
    "KURA_HTTP_WORKERS" $c.httpWorkers
    "KURA_GRPC_WORKERS" $c.grpcWorkers
    "KURA_WORKER_CONNECTIONS" $c.workerConnections
    "KURA_HTTP_HEADER_TIMEOUT_MS" $c.httpHeaderTimeoutMs
    "KURA_TMP_DIR_MAX_BYTES" $c.tmpDirMaxBytes
    "KURA_CAS_CAPACITY_BYTES" $c.casCapacityBytes
    "KURA_MULTIPART_UPLOAD_TTL_MS" $c.multipartUploadTtlMs
    "KURA_SEGMENT_MAX_BYTES" $c.segmentMaxBytes
    "KURA_LMDB_MAP_SIZE" $c.lmdbMapSize
    "KURA_MAX_KEYVALUE_BYTES" $c.memory.maxKeyvalueBytes
    "KURA_DRAIN_COMPLETION_TIMEOUT_MS" $c.shutdown.drainCompletionTimeoutMs
    "KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND" $c.replication.bandwidthLimitBytesPerSecond
    "KURA_REPLICATION_PUBLIC_LATENCY_TARGET_MS" $c.replication.publicLatencyTargetMs
    "KURA_OUTBOX_MAX_DEPTH" $c.replication.outboxMaxDepth
    "KURA_PEER_CONNECT_TIMEOUT_MS" $c.replication.peerConnectTimeoutMs
    "KURA_PEER_IDLE_TIMEOUT_MS" $c.replication.peerIdleTimeoutMs
    "KURA_PEER_LOSS_TIMEOUT_MS" $c.replication.peerLossTimeoutMs
    "KURA_BOOTSTRAP_TIMEOUT_MS" $c.bootstrap.timeoutMs
    "KURA_BOOTSTRAP_MAX_CONCURRENT_PEERS" $c.bootstrap.maxConcurrentPeers
    "KURA_EXTENSION_HOOK_TIMEOUT_MS" .Values.extension.hookTimeoutMs -}}
{{- range $name := keys $settings | sortAlpha }}
{{- $value := get $settings $name }}
{{- if ne $value nil }}
- name: {{ $name }}
  value: {{ if kindIs "string" $value }}{{ $value | quote }}{{ else }}{{ printf "%d" (int64 $value) | quote }}{{ end }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Kura settings that kura-py accepts in a values file but has no use for (see README.md,
"Kura keys without effect"): the ones set to something other than null, comma-separated,
for NOTES.txt.
*/}}
{{- define "kura.inertConfigKeys" -}}
{{- $set := list -}}
{{- range $path := list
    "fileDescriptors.poolSize" "fileDescriptors.acquireTimeoutMs" "fileDescriptors.segmentHandleCacheSize"
    "acceleratedFileServing.enabled" "acceleratedFileServing.mode" "acceleratedFileServing.maxConcurrent"
    "acceleratedFileServing.chunkBytes" "actionCache.evictionCascadeEnabled"
    "backfill.marginPercent" "backfill.readyRingPercent" "backfill.batchBytes"
    "memory.softLimitBytes" "memory.hardLimitBytes" "memory.snapshotCacheMaxBytes" "memory.manifestCacheMaxBytes"
    "metadataStore.maxOpenFiles" "metadataStore.maxBackgroundJobs"
    "replication.uploadStallMs" "replication.outboxMaxInflight"
    "usage.networkPath" "geoip.refreshIntervalSecs" -}}
{{- $parts := splitList "." $path -}}
{{- $group := get $.Values.config (index $parts 0) -}}
{{- $key := index $parts 1 -}}
{{- if and (kindIs "map" $group) (hasKey $group $key) (ne (get $group $key) nil) -}}
{{- $set = append $set (printf "config.%s" $path) -}}
{{- end -}}
{{- end -}}
{{- join ", " $set -}}
{{- end -}}

{{/* Fail the render on values the schema cannot judge, instead of deploying a node that refuses to start. */}}
{{- define "kura.validate" -}}
{{- if and .Values.extension.enabled (not .Values.extension.script) (not .Values.extension.existingConfigMap) -}}
{{- fail "extension.enabled requires extension.script or extension.existingConfigMap" -}}
{{- end -}}
{{- if .Values.peerTls.enabled -}}
{{- range .Values.config.extraSeedPeers -}}
{{- if not (hasPrefix "https://" .) -}}
{{- fail (printf "config.extraSeedPeers: %s must be an https:// URL with peerTls.enabled" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
