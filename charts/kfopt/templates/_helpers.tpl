{{/* Names ------------------------------------------------------------------------------ */}}
{{- define "kfopt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kfopt.fullname" -}}
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

{{/* A component's name: FULLNAME-SUFFIX, within the 63 characters of a DNS label. */}}
{{- define "kfopt.componentName" -}}
{{- printf "%s-%s" (include "kfopt.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "kfopt.mlflowName" -}}{{ include "kfopt.componentName" (dict "root" . "component" "mlflow") }}{{- end -}}
{{- define "kfopt.configName" -}}{{ include "kfopt.componentName" (dict "root" . "component" "config") }}{{- end -}}

{{- define "kfopt.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kfopt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kfopt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kfopt.labels" -}}
helm.sh/chart: {{ include "kfopt.chart" . }}
{{ include "kfopt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kfopt
{{- end -}}

{{- define "kfopt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kfopt.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false (the ServiceAccount must exist)" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Images ------------------------------------------------------------------------------ */}}
{{/* REPOSITORY:TAG, or REPOSITORY:TAG@DIGEST when a digest pins it (the runtime pulls by digest; the tag is for people). */}}
{{- define "kfopt.imageRef" -}}
{{- printf "%s:%s" .repository .tag -}}{{- with .digest }}@{{ . }}{{ end -}}
{{- end -}}

{{- define "kfopt.image" -}}
{{- include "kfopt.imageRef" (dict "repository" .Values.image.repository "tag" (default .Chart.AppVersion .Values.image.tag) "digest" .Values.image.digest) -}}
{{- end -}}

{{/* The server's image: mlflow.image overrides image; image.digest applies only while neither repository nor tag is overridden. */}}
{{- define "kfopt.mlflowImage" -}}
{{- $m := .Values.mlflow.image -}}
{{- $digest := $m.digest -}}
{{- if and (not $digest) (not $m.repository) (not $m.tag) }}{{ $digest = .Values.image.digest }}{{ end -}}
{{- include "kfopt.imageRef" (dict "repository" (default .Values.image.repository $m.repository) "tag" (default (default .Chart.AppVersion .Values.image.tag) $m.tag) "digest" $digest) -}}
{{- end -}}

{{- define "kfopt.stepImage" -}}
{{- default (include "kfopt.image" .) .Values.pipeline.image -}}
{{- end -}}

{{- define "kfopt.pipelineName" -}}
{{- default (include "kfopt.fullname" .) .Values.pipeline.name -}}
{{- end -}}

{{/* MLflow ------------------------------------------------------------------------------ */}}
{{/* "true" when this release deploys the MLflow server (an external URI wins). */}}
{{- define "kfopt.mlflowDeployed" -}}
{{- if and .Values.mlflow.enabled (not .Values.mlflow.external.uri) -}}true{{- end -}}
{{- end -}}

{{/* The tracking URI the pipeline uses: the external server, this release's server, or none.
A login never travels in it: userinfo (user:password@) of mlflow.external.uri is dropped here, so it
reaches no argument, run parameter or NOTES (the schema refuses it; this holds with --skip-schema-validation). */}}
{{- define "kfopt.trackingUri" -}}
{{- if .Values.mlflow.external.uri -}}
{{- include "kfopt.withoutUserinfo" .Values.mlflow.external.uri -}}
{{- else if .Values.mlflow.enabled -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "kfopt.mlflowName" .) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.service.port) -}}
{{- end -}}
{{- end -}}

{{/* A URI without the userinfo of its authority: scheme://user:password@host/path -> scheme://host/path. */}}
{{- define "kfopt.withoutUserinfo" -}}
{{- regexReplaceAll "^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@" . "${1}" -}}
{{- end -}}

{{/* "true" when the external URI carried a login that kfopt.trackingUri dropped. */}}
{{- define "kfopt.externalUriHadUserinfo" -}}
{{- if regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*@" .Values.mlflow.external.uri -}}true{{- end -}}
{{- end -}}

{{/* "true" when the deployed server asks for a login (MLflow's basic-auth app). */}}
{{- define "kfopt.authEnabled" -}}
{{- if and (include "kfopt.mlflowDeployed" .) .Values.mlflow.auth.enabled -}}true{{- end -}}
{{- end -}}

{{/* The Secret the chart generates: the Flask secret key, and the admin login unless auth.existingSecret holds it. */}}
{{- define "kfopt.authSecretName" -}}{{ include "kfopt.componentName" (dict "root" . "component" "mlflow-auth") }}{{- end -}}

{{/* The Secret holding the admin login: auth.existingSecret, else the generated one. */}}
{{- define "kfopt.adminSecretName" -}}
{{- default (include "kfopt.authSecretName" .) .Values.mlflow.auth.existingSecret -}}
{{- end -}}

{{/* Where the server's and the migration's PostgreSQL URIs come from (serve-mlflow.py builds them; no password in the spec). */}}
{{- define "kfopt.databaseEnv" -}}
{{- $m := .Values.mlflow -}}
{{- if eq $m.backendStore.type "sqlite" }}
- name: MLFLOW_BACKEND_STORE_URI
  value: sqlite:////data/mlflow.db
{{- else }}
{{- with $m.backendStore.postgresql }}
- name: KFOPT_DB_HOST
  value: {{ .host | quote }}
- name: KFOPT_DB_PORT
  value: {{ int .port | quote }}
- name: KFOPT_DB_NAME
  value: {{ .database | quote }}
- name: KFOPT_DB_USER
  value: {{ .user | quote }}
{{- with .sslmode }}
- name: KFOPT_DB_SSLMODE
  value: {{ . | quote }}
{{- end }}
- name: KFOPT_DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .passwordKey }}
{{- end }}
{{- with $m.auth.postgresql.database }}
- name: KFOPT_AUTH_DB_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- if $m.auth.enabled }}
- name: KFOPT_AUTH_CONFIG
  value: /etc/kfopt/basic_auth.ini
{{- end }}
{{- end -}}

{{/* MLflow's basic_auth.ini (MLFLOW_AUTH_CONFIG_PATH). The admin login comes from a Secret through
MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD, never from here. With PostgreSQL, serve-mlflow.py fills in
database_uri at start (it holds the password) and hands MLflow a private copy. */}}
{{- define "kfopt.authConfig" -}}
[mlflow]
default_permission = {{ .Values.mlflow.auth.defaultPermission }}
{{- if eq .Values.mlflow.backendStore.type "sqlite" }}
database_uri = sqlite:////data/basic_auth.db
{{- else }}
# Filled in by serve-mlflow.py from KFOPT_DB_* (and KFOPT_AUTH_DB_NAME).
database_uri =
{{- end }}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
{{- end -}}

{{/* The namespace the pipeline steps run in: the profile namespace, else KFP's own. */}}
{{- define "kfopt.pipelineNamespace" -}}
{{- .Values.mlflow.networkPolicy.pipelineNamespace | default .Values.kfp.namespace | default "kubeflow" -}}
{{- end -}}

{{/* Security ---------------------------------------------------------------------------- */}}
{{/* Environment variable names that hold credentials: never plain values (values.schema.json has the same pattern). */}}
{{- define "kfopt.credentialNamePattern" -}}
(?i)(PASS($|WORD|WD|PHRASE)|SECRET|TOKEN|CREDENTIAL|PRIVATE_?KEY|ACCESS_?KEY|API_?KEY|CONNECTION_?STRING|_KEY(_ID)?$|(^|_)(SAS|DSN)$)
{{- end -}}

{{- define "kfopt.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext }}
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ int .runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ int .runAsGroup }}
{{- end }}
{{- if not (kindIs "invalid" .fsGroup) }}
fsGroup: {{ int .fsGroup }}
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "kfopt.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The writable directories of a read-only container: /tmp and HOME. */}}
{{- define "kfopt.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.emptyDirSizeLimit }}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.emptyDirSizeLimit }}
{{- end -}}

{{- define "kfopt.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/kfopt
{{- end -}}

{{- define "kfopt.scratchEnv" -}}
- name: HOME
  value: /home/kfopt
- name: TMPDIR
  value: /tmp
{{- end -}}

{{/* The KFP API token: a projected service-account token where kfopt looks for it. */}}
{{- define "kfopt.kfpTokenVolume" -}}
- name: kfp-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: {{ .Values.kfp.token.audience }}
          expirationSeconds: {{ int .Values.kfp.token.expirationSeconds }}
{{- end -}}

{{- define "kfopt.kfpTokenMount" -}}
- name: kfp-token
  mountPath: /var/run/secrets/kubeflow/pipelines
  readOnly: true
{{- end -}}

{{- define "kfopt.kfpTokenEnv" -}}
- name: KF_PIPELINES_SA_TOKEN_PATH
  value: /var/run/secrets/kubeflow/pipelines/token
{{- end -}}

{{- define "kfopt.configVolume" -}}
- name: config
  configMap:
    name: {{ include "kfopt.configName" . }}
{{- end -}}

{{- define "kfopt.configMount" -}}
- name: config
  mountPath: /etc/kfopt
  readOnly: true
{{- end -}}

{{/* Pull secrets, node selector, affinity and tolerations of the chart's pods; the MLflow server's own values replace the chart-wide ones. */}}
{{- define "kfopt.podScheduling" -}}
{{- $root := .root | default . -}}
{{- $own := .own | default dict -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $own.nodeSelector | default $root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $own.affinity | default $root.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $own.tolerations | default $root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pipeline ---------------------------------------------------------------------------- */}}
{{/* `kfopt compile/submit` options that shape the compiled pipeline (a YAML list of args). */}}
{{- define "kfopt.compileArgs" -}}
- --image
- {{ include "kfopt.stepImage" . | quote }}
{{- with .Values.pipeline.acceleratorImage }}
- --accelerator-image
- {{ . | quote }}
{{- end }}
- --placement
- /etc/kfopt/placement.yaml
{{- if .Values.pipeline.search }}
- --search
- /etc/kfopt/search.yaml
{{- end }}
- --parallelism
- {{ int .Values.pipeline.parallelism | quote }}
- --rounds
- {{ int .Values.pipeline.rounds | quote }}
- --step-retries
- {{ int .Values.pipeline.stepRetries | quote }}
{{- with .Values.pipeline.mlflowSecret }}
- --mlflow-secret
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* One pool of the placement file, in the format kfopt.pipelines.placement loads (snake_case keys). */}}
{{- define "kfopt.placementPool" -}}
{{- $pool := dict -}}
{{- if .accelerator -}}
{{- $_ := set $pool "accelerator" (dict "type" .values.type "count" (int .values.count)) -}}
{{- end -}}
{{- range $key, $file := dict "cpu" "cpu" "memory" "memory" "cpuLimit" "cpu_limit" "memoryLimit" "memory_limit" -}}
{{- $value := index $.values $key -}}
{{- if not (kindIs "invalid" $value) -}}
{{- if ne (toString $value) "" -}}
{{- $_ := set $pool $file (toString $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with .values.nodeSelector -}}
{{- $labels := dict -}}
{{- range $key, $value := . -}}
{{- if not (kindIs "invalid" $value) -}}
{{- $_ := set $labels $key (toString $value) -}}
{{- end -}}
{{- end -}}
{{- if $labels -}}
{{- $_ := set $pool "node_selector" $labels -}}
{{- end -}}
{{- end -}}
{{- with .values.tolerations -}}
{{- $_ := set $pool "tolerations" . -}}
{{- end -}}
{{- toYaml $pool -}}
{{- end -}}

{{- define "kfopt.placementFile" -}}
# Node pools of the kfopt pipeline steps (rendered from the chart's `placement` values).
# `kfopt compile --placement` reads this file; see pipelines/placement.py.
pools:
  cpu:
    {{- include "kfopt.placementPool" (dict "values" .Values.placement.cpu "accelerator" false) | nindent 4 }}
{{- if .Values.placement.accelerator.enabled }}
  accelerator:
    {{- include "kfopt.placementPool" (dict "values" .Values.placement.accelerator "accelerator" true) | nindent 4 }}
{{- end }}
{{- end -}}
