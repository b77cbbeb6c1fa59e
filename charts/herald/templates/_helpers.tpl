{{/* Object name prefix: <release>-herald, or the release name when it already says herald. */}}
{{- define "herald.fullname" -}}
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

{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "herald.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "herald.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- end -}}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "true" when herald stores in NATS JetStream (config.store.engine), else empty. */}}
{{- define "herald.jetstream" -}}
{{- if eq (dig "store" "engine" "sqlite" .Values.config) "jetstream" -}}true{{- end -}}
{{- end -}}

{{/*
herald's config file: .Values.config merged over the values the pod spec is wired to
(listen port; with the embedded store, the data volume and its quota), plus the
certificate paths when TLS is on.
*/}}
{{- define "herald.config" -}}
{{- $store := dict -}}
{{- if not (include "herald.jetstream" .) -}}
{{- $_ := set $store "path" "/var/lib/herald" -}}
{{- if .Values.persistence.enabled -}}
{{- $_ := set $store "quotaBytes" (include "herald.quotaBytes" . | atoi) -}}
{{- end -}}
{{- end -}}
{{- $config := mergeOverwrite (dict "listen" (printf "0.0.0.0:%v" .Values.containerPort) "store" $store) (deepCopy .Values.config) -}}
{{- $config = mergeOverwrite $config (dict "api" (dict "auth" (dict "kubernetes" .Values.api.auth.kubernetes))) -}}
{{- if .Values.tls.enabled -}}
{{- $tls := dict "certFile" "/etc/herald/tls/tls.crt" "keyFile" "/etc/herald/tls/tls.key" -}}
{{- $config = mergeOverwrite $config (dict "api" (dict "tls" $tls)) -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The id counter ConfigMap herald writes (config key controller.idCounter). */}}
{{- define "herald.idCounter" -}}
{{- dig "controller" "idCounter" "herald-subscription-ids" (fromYaml (include "herald.config" .)) -}}
{{- end -}}

{{/*
The Secrets of the release namespace herald reads through the API, as a JSON list, each
once: the ESB app credentials (config key api.esbCredentialsSecret), the signing keys
(signingSecrets) and the CmdbSource credentials (sourceCredentialsSecrets). The chart
itself creates no Secret; the TLS and NATS Secrets are mounted by the kubelet, which
herald's ServiceAccount needs no rule for.
*/}}
{{- define "herald.readSecrets" -}}
{{- $names := list -}}
{{- with dig "api" "esbCredentialsSecret" "" (fromYaml (include "herald.config" .)) -}}
{{- $names = append $names . -}}
{{- end -}}
{{- $names = concat $names (.Values.signingSecrets | default list) (.Values.sourceCredentialsSecrets | default list) -}}
{{- toJson (uniq $names) -}}
{{- end -}}

{{/* The leader Lease herald holds (config key leaderElection.leaseName). */}}
{{- define "herald.leaseName" -}}
{{- dig "leaderElection" "leaseName" "herald-leader" (fromYaml (include "herald.config" .)) -}}
{{- end -}}

{{/*
The store quota when config.store.quotaBytes is not set: 80 % of the data volume, leaving
room for the WAL (truncated back to 64 MiB) and checkpoints, so publish answers 503 over
quota before the disk fills. persistence.size in Ki/Mi/Gi/Ti (or K/M/G/T, or bytes).
*/}}
{{- define "herald.quotaBytes" -}}
{{- $size := toString .Values.persistence.size -}}
{{- $number := regexFind "^[0-9]+" $size | int64 -}}
{{- $unit := regexReplaceAll "^[0-9]+" $size "" -}}
{{- $units := dict "" 1 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- if not (hasKey $units $unit) -}}
{{- fail (printf "persistence.size %q: use a number with Ki, Mi, Gi or Ti" $size) -}}
{{- end -}}
{{- div (mul $number (get $units $unit) 4) 5 -}}
{{- end -}}
