{{/* Names, labels and the rendered gateway configuration. */}}

{{- define "dgrs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgrs.fullname" -}}
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

{{- define "dgrs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels; call with (dict "root" $ "component" "gateway"). */}}
{{- define "dgrs.labels" -}}
helm.sh/chart: {{ include "dgrs.chart" .root }}
app.kubernetes.io/name: {{ include "dgrs.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: dask-gateway
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{- define "dgrs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dgrs.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dgrs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dgrs.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dgrs.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Namespace of the DaskClusters and their pods. */}}
{{- define "dgrs.clustersNamespace" -}}
{{- default .Release.Namespace .Values.clusters.namespace -}}
{{- end -}}

{{- define "dgrs.instance" -}}
{{- default (include "dgrs.fullname" .) .Values.clusters.instance | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgrs.passwordSecret" -}}
{{- if .Values.auth.simple.existingSecret -}}
{{- .Values.auth.simple.existingSecret -}}
{{- else -}}
{{- printf "%s-auth" (include "dgrs.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Where scheduler pods reach the gateway API: the gateway Service (any replica). */}}
{{- define "dgrs.apiUrl" -}}
{{- printf "http://%s.%s.svc:%v%s/api" (include "dgrs.fullname" .) .Release.Namespace .Values.service.port (trimSuffix "/" .Values.gateway.prefix) -}}
{{- end -}}

{{/* A pod template without empty keys. */}}
{{- define "dgrs.podTemplate" -}}
{{- $t := dict -}}
{{- range $k, $v := . -}}
{{- if $v -}}{{- $_ := set $t $k $v -}}{{- end -}}
{{- end -}}
{{- toJson $t -}}
{{- end -}}

{{/* The gateway configuration file (docs/configuration.md), from the values. */}}
{{- define "dgrs.config" -}}
{{- $c := .Values.clusters -}}
{{- $cluster := dict
  "scheduler_cores" $c.scheduler.cores
  "scheduler_memory" (toString $c.scheduler.memory)
  "worker_cores" $c.worker.cores
  "worker_memory" (toString $c.worker.memory)
  "idle_timeout" $c.idleTimeout
  "start_timeout" $c.startTimeout
  "heartbeat_period" $c.heartbeatPeriod
  "adaptive_period" $c.adaptivePeriod
  "worker_start_failure_limit" $c.workerStartFailureLimit
  "environment" $c.environment
  "options" $c.options
-}}
{{- with $c.scheduler.coresLimit }}{{ $_ := set $cluster "scheduler_cores_limit" . }}{{ end -}}
{{- with $c.scheduler.memoryLimit }}{{ $_ := set $cluster "scheduler_memory_limit" (toString .) }}{{ end -}}
{{- with $c.worker.coresLimit }}{{ $_ := set $cluster "worker_cores_limit" . }}{{ end -}}
{{- with $c.worker.memoryLimit }}{{ $_ := set $cluster "worker_memory_limit" (toString .) }}{{ end -}}
{{- with $c.worker.threads }}{{ $_ := set $cluster "worker_threads" . }}{{ end -}}
{{- with $c.profile }}{{ $_ := set $cluster "profile" . }}{{ end -}}
{{- with $c.limits.maxWorkers }}{{ $_ := set $cluster "max_workers" . }}{{ end -}}
{{- with $c.limits.adaptMaximumDefault }}{{ $_ := set $cluster "adapt_maximum_default" . }}{{ end -}}
{{- with $c.limits.adaptMaximumMax }}{{ $_ := set $cluster "adapt_maximum_max" . }}{{ end -}}
{{- with $c.limits.maxCores }}{{ $_ := set $cluster "max_cores" . }}{{ end -}}
{{- with $c.limits.maxMemory }}{{ $_ := set $cluster "max_memory" (toString .) }}{{ end -}}
{{- with $c.limits.maxClustersPerUser }}{{ $_ := set $cluster "max_clusters_per_user" . }}{{ end -}}
{{- with $c.limits.maxWorkersPerUser }}{{ $_ := set $cluster "max_workers_per_user" . }}{{ end -}}
{{- with $c.limits.maxCoresPerUser }}{{ $_ := set $cluster "max_cores_per_user" . }}{{ end -}}
{{- with $c.limits.maxMemoryPerUser }}{{ $_ := set $cluster "max_memory_per_user" (toString .) }}{{ end -}}
{{- with $c.maxLifetime }}{{ $_ := set $cluster "max_lifetime" . }}{{ end -}}
{{- with $c.noClientTimeout }}{{ $_ := set $cluster "no_client_timeout" . }}{{ end -}}
{{- with $c.warmSchedulers }}{{ $_ := set $cluster "warm_schedulers" . }}{{ end -}}
{{- $kube := dict
  "namespace" (include "dgrs.clustersNamespace" .)
  "instance" (include "dgrs.instance" .)
  "image" $c.image
  "image_pull_secrets" $c.imagePullSecrets
  "scheduler" (include "dgrs.podTemplate" $c.scheduler.template | fromJson)
  "worker" (include "dgrs.podTemplate" $c.worker.template | fromJson)
  "profiles" $c.profiles
  "termination_grace_period_seconds" $c.terminationGracePeriodSeconds
  "pod_security_context" $c.podSecurityContext
  "security_context" $c.securityContext
  "controller" .Values.controller.embedded
  "api_qps" .Values.controller.apiQps
  "api_burst" .Values.controller.apiBurst
  "reconcile_concurrency" .Values.controller.reconcileConcurrency
  "worker_batch" .Values.controller.workerBatch
  "completed_cluster_max_age" .Values.controller.completedClusterMaxAge
-}}
{{- with $c.imagePullPolicy }}{{ $_ := set $kube "image_pull_policy" . }}{{ end -}}
{{- with $c.serviceAccount }}{{ $_ := set $kube "service_account" . }}{{ end -}}
{{- $config := dict
  "address" "0.0.0.0:8000"
  "backend" "kubernetes"
  "api_url" (include "dgrs.apiUrl" .)
  "log_format" .Values.gateway.logFormat
  "log_level" .Values.gateway.logLevel
  "request_timeout" .Values.gateway.requestTimeout
  "dashboard_auth" .Values.gateway.dashboardAuth
  "stop_clusters_on_shutdown" .Values.gateway.stopClustersOnShutdown
  "auth" (dict "type" .Values.auth.type "admin_users" .Values.auth.adminUsers "admin_groups" .Values.auth.adminGroups "groups" .Values.auth.groups "cookie_name" (printf "dask-gateway-%s" (include "dgrs.instance" .)))
  "kubernetes" $kube
  "cluster" $cluster
  "groups" .Values.groups
-}}
{{- if eq .Values.auth.type "jwt" -}}
{{- $j := .Values.auth.jwt -}}
{{- $jwt := dict "leeway" $j.leeway "username_claim" $j.usernameClaim "groups_claim" $j.groupsClaim "admin_groups" $j.adminGroups -}}
{{- if $j.existingSecret }}{{ $_ := set $jwt "secret_env" "GATEWAY_JWT_SECRET" }}{{ else }}{{ $_ := set $jwt "jwks_url" (required "auth.jwt needs existingSecret or jwksUrl" $j.jwksUrl) }}{{ end -}}
{{- with $j.issuer }}{{ $_ := set $jwt "issuer" . }}{{ end -}}
{{- with $j.audience }}{{ $_ := set $jwt "audience" . }}{{ end -}}
{{- $_ := set $config.auth "jwt" $jwt -}}
{{- end -}}
{{- if eq .Values.auth.type "jupyterhub" -}}
{{- $h := .Values.auth.jupyterhub -}}
{{- $hub := dict "api_url" (required "auth.jupyterhub.apiUrl is required with auth.type jupyterhub" $h.apiUrl) "api_token_env" "GATEWAY_JUPYTERHUB_TOKEN" "service_name" $h.serviceName "hub_admins_are_admins" $h.hubAdminsAreAdmins -}}
{{- $_ := required "auth.jupyterhub.existingSecret (the hub service token) is required with auth.type jupyterhub" $h.existingSecret -}}
{{- with $h.publicUrl }}{{ $_ := set $hub "public_url" . }}{{ end -}}
{{- with $h.oauthRedirectUri }}{{ $_ := set $hub "oauth_redirect_uri" . }}{{ end -}}
{{- $_ := set $config.auth "jupyterhub" $hub -}}
{{- end -}}
{{- with .Values.gateway.prefix }}{{ $_ := set $config "prefix" . }}{{ end -}}
{{- if .Values.service.schedulerPort }}{{ $_ := set $config "scheduler_address" "0.0.0.0:8786" }}{{ end -}}
{{- $merged := mustMergeOverwrite $config (deepCopy .Values.extraConfig) -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* A memory size of the gateway's (bytes, or 2G-style with powers of 1024) as a Kubernetes
quantity: 2G -> 2Gi, 512M -> 512Mi, 2GiB -> 2Gi, bytes unchanged. */}}
{{- define "dgrs.quantity" -}}
{{- $s := toString . | trimSuffix "B" -}}
{{- if regexMatch "^[0-9.]+[KMGT]$" $s -}}{{ $s }}i{{- else -}}{{ $s }}{{- end -}}
{{- end -}}
