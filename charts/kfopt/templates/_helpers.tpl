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
{{- define "kfopt.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kfopt.mlflowImage" -}}
{{- printf "%s:%s" (default .Values.image.repository .Values.mlflow.image.repository) (default (default .Chart.AppVersion .Values.image.tag) .Values.mlflow.image.tag) -}}
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

{{/* The tracking URI the pipeline uses: the external server, this release's server, or none. */}}
{{- define "kfopt.trackingUri" -}}
{{- if .Values.mlflow.external.uri -}}
{{- .Values.mlflow.external.uri -}}
{{- else if .Values.mlflow.enabled -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "kfopt.mlflowName" .) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.service.port) -}}
{{- end -}}
{{- end -}}

{{/* Security ---------------------------------------------------------------------------- */}}
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

{{- define "kfopt.podScheduling" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
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
