{{- define "ferry.rev" -}}{{ if .Values.revision }}-{{ .Values.revision }}{{ end }}{{- end -}}
{{- define "ferry.injector" -}}ferry-injector{{ include "ferry.rev" . }}{{- end -}}
{{- define "ferry.service" -}}{{ .Values.webhook.serviceName | default (include "ferry.injector" .) }}{{- end -}}
{{- define "ferry.webhook" -}}{{ .Values.webhook.name | default (printf "ferry-sidecar-injector%s" (include "ferry.rev" .)) }}{{- end -}}
{{- define "ferry.tlsSecret" -}}{{ include "ferry.injector" . }}-tls{{- end -}}
{{- define "ferry.image" -}}{{ .Values.injector.image.repository }}:{{ .Values.injector.image.tag | default .Chart.AppVersion }}{{- end -}}

{{- define "ferry.labels" -}}
app.kubernetes.io/name: ferry-injector
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
istio.io/rev: {{ .Values.revision | default "default" | quote }}
{{- end -}}

{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: ferry-injector
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* The namespaces the webhook is never called for. */ -}}
{{- define "ferry.excluded" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values:
  {{- range (uniq (append .Values.webhook.excludeNamespaces .Release.Namespace)) }}
  - {{ . | quote }}
  {{- end }}
{{- end -}}

{{- /* One webhook entry; .Prefix names it, the caller adds the selectors. */ -}}
{{- define "ferry.hook" -}}
- name: {{ .Prefix }}sidecar-injector.istio.io
  clientConfig:
    service:
      name: {{ include "ferry.service" .Root }}
      namespace: {{ .Root.Release.Namespace | quote }}
      path: /inject
      port: 443
  rules:
  - operations: ["CREATE"]
    apiGroups: [""]
    apiVersions: ["v1"]
    resources: ["pods"]
  sideEffects: None
  failurePolicy: {{ .Root.Values.webhook.failurePolicy }}
  reinvocationPolicy: {{ .Root.Values.webhook.reinvocationPolicy }}
  admissionReviewVersions: ["v1"]
  timeoutSeconds: {{ .Root.Values.webhook.timeoutSeconds }}
{{- end -}}
