{{/* Names and labels. */}}
{{- define "pdserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The head pod, where the router runs (labels KubeRay sets on it). */}}
{{- define "pdserve.routerSelector" -}}
ray.io/cluster: {{ include "pdserve.fullname" . }}
ray.io/node-type: head
{{- end -}}

{{/* Where every pod sees the model. */}}
{{- define "pdserve.modelPath" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "builtin" -}}pdserve-tiny
{{- else if eq $m.source "pvc" -}}{{ printf "/models/%s" (required "model.pvc.path is required with model.source=pvc" $m.pvc.path) }}
{{- else -}}{{ printf "/models/%s" (required "model.huggingface.repo is required with model.source=huggingface" $m.huggingface.repo) }}
{{- end -}}
{{- end -}}

{{/* pdserve workers per pod of a role: one per GPU, one on CPU. */}}
{{- define "pdserve.workersPerPod" -}}
{{- if gt (int .gpu.count) 0 }}{{ .gpu.count }}{{ else }}1{{ end -}}
{{- end -}}

{{/* min <= replicas <= max, per role. */}}
{{- define "pdserve.checkReplicas" -}}
{{- range $name, $role := .Values.roles -}}
{{- if or (gt (int $role.minReplicas) (int $role.replicas)) (gt (int $role.replicas) (int $role.maxReplicas)) -}}
{{- fail (printf "roles.%s: need minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v" $name $role.minReplicas $role.replicas $role.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The router's command line, one shell word per item (single-quoted). */}}
{{- define "pdserve.serveArgs" -}}
{{- $v := .Values -}}
{{- $p := $v.roles.prefill -}}
{{- $d := $v.roles.decode -}}
{{- $args := list "pdserve" "serve" "--address" "auto" "--host" "0.0.0.0" "--port" (toString $v.router.port) -}}
{{- $args = concat $args (list "--model" (include "pdserve.modelPath" .)) -}}
{{- with $v.model.servedModelName }}{{ $args = concat $args (list "--served-model-name" .) }}{{ end -}}
{{- $args = concat $args (list "--device" $v.engine.device "--dtype" $v.engine.dtype) -}}
{{- $args = concat $args (list "--num-prefill" (toString (mul (int $p.replicas) (int (include "pdserve.workersPerPod" $p))))) -}}
{{- $args = concat $args (list "--num-decode" (toString (mul (int $d.replicas) (int (include "pdserve.workersPerPod" $d))))) -}}
{{- $args = concat $args (list "--prefill-resources" (dict "prefill_node" 1 | toJson) "--decode-resources" (dict "decode_node" 1 | toJson)) -}}
{{- with $p.gpu.acceleratorType }}{{ if gt (int $p.gpu.count) 0 }}{{ $args = concat $args (list "--prefill-accelerator-type" .) }}{{ end }}{{ end -}}
{{- with $d.gpu.acceleratorType }}{{ if gt (int $d.gpu.count) 0 }}{{ $args = concat $args (list "--decode-accelerator-type" .) }}{{ end }}{{ end -}}
{{- if and (eq (int $p.gpu.count) 0) (eq (int $d.gpu.count) 0) }}{{ $args = concat $args (list "--num-gpus-per-worker" "0") }}{{ end -}}
{{- $args = concat $args (list "--kv-host" "0.0.0.0") -}}
{{- $args = concat $args (list "--local-prefill-threshold" (toString $v.router.localPrefillThreshold) "--admission-timeout-s" (toString $v.router.admissionTimeoutS)) -}}
{{- with $v.engine.maxModelLen }}{{ $args = concat $args (list "--max-model-len" (toString .)) }}{{ end -}}
{{- with $v.engine.blockSize }}{{ $args = concat $args (list "--block-size" (toString .)) }}{{ end -}}
{{- with $v.engine.maxNumSeqs }}{{ $args = concat $args (list "--max-num-seqs" (toString .)) }}{{ end -}}
{{- with $v.engine.gpuMemoryUtilization }}{{ $args = concat $args (list "--gpu-memory-utilization" (toString .)) }}{{ end -}}
{{- with $v.engine.kvCacheSizeGib }}{{ $args = concat $args (list "--kv-cache-size-gib" (toString .)) }}{{ end -}}
{{- $args = append $args (ternary "--enable-prefix-caching" "--no-enable-prefix-caching" $v.engine.enablePrefixCaching) -}}
{{- $args = concat $args $v.engine.extraArgs $v.router.extraArgs -}}
{{- range $i, $a := $args }}{{ if $i }} {{ end }}{{ squote $a }}{{ end -}}
{{- end -}}

{{/* Volumes every Ray pod of a role mounts: shared memory and the model. */}}
{{- define "pdserve.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- if eq .root.Values.model.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required with model.source=pvc" .root.Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .root.Values.model.source "huggingface" }}
- name: models
  emptyDir:
    sizeLimit: {{ .root.Values.model.huggingface.cacheSizeLimit }}
{{- end }}
{{- end -}}

{{- define "pdserve.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if ne .Values.model.source "builtin" }}
- name: models
  mountPath: /models
  readOnly: {{ eq .Values.model.source "pvc" }}
{{- end }}
{{- end -}}

{{/* Hugging Face: an init container downloads the repo (the head only needs the tokenizer). */}}
{{- define "pdserve.initContainers" -}}
{{- $hf := .root.Values.model.huggingface -}}
{{- if eq .root.Values.model.source "huggingface" }}
- name: download-model
  image: {{ printf "%s:%s" .root.Values.image.repository .root.Values.image.tag }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command:
    - hf
    - download
    - {{ $hf.repo | quote }}
    - --revision
    - {{ $hf.revision | quote }}
    - --local-dir
    - {{ include "pdserve.modelPath" .root | quote }}
    {{- if .tokenizerOnly }}
    - --include
    - "*.json"
    - "*.model"
    - "*.tiktoken"
    - "*.txt"
    {{- end }}
  env:
    - name: HF_HUB_OFFLINE  # the image is offline by default; this container downloads
      value: "0"
  {{- with $hf.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $hf.tokenSecret.key }}
  {{- end }}
  securityContext:
    {{- include "pdserve.securityContext" . | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
{{- end }}
{{- end -}}

{{- define "pdserve.securityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}
