{{/* The app name (app.kubernetes.io/name): nameOverride, else the chart's name. */}}
{{- define "analysis-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* What the release's objects are named after: fullnameOverride, else <release>-<name>
(just <release> when it already contains the name). */}}
{{- define "analysis-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "analysis-operator.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Objects `helm uninstall` leaves in place (the catalogue and the budgets' ledgers). */}}
{{- define "analysis-operator.keep" -}}
helm.sh/resource-policy: keep
{{- end }}

{{- define "analysis-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "analysis-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Not app.kubernetes.io/managed-by=analysis-operator: that label marks environment pods. */}}
{{- define "analysis-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "analysis-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: analysis-operator
{{- end }}

{{/* The operator's ServiceAccount. Without serviceAccount.create the site names its own: never the
namespace's `default`, which every pod there runs as without asking (values.schema.json refuses it
too; this holds with --skip-schema-validation). */}}
{{- define "analysis-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "analysis-operator.fullname" .) .Values.serviceAccount.name }}
{{- else if and .Values.serviceAccount.name (ne .Values.serviceAccount.name "default") }}
{{- .Values.serviceAccount.name }}
{{- else }}
{{- fail "serviceAccount.create is false: set serviceAccount.name to the existing ServiceAccount the operator runs as (not `default`: the operator's rights would go to every pod of the namespace that runs without one)" }}
{{- end }}
{{- end }}

{{/* The namespaces this release's operator serves, as a namespaceSelector (empty: every namespace):
watchNamespace's, else all. Its webhooks and its admission policies' bindings match exactly these:
fewer would leave served namespaces unchecked (who created an environment is known only at
admission), more would let this release judge another release's namespaces. */}}
{{- define "analysis-operator.servedNamespaces" -}}
{{- if .Values.admission.namespaceSelector }}
{{- fail "admission.namespaceSelector is no longer supported: the webhooks must see every namespace the operator serves (watchNamespace, else all), as who created an environment or a BudgetRequest, and who decided one, is known only at admission and not checked again at reconcile. Remove it; to choose where environments run, use watchNamespace, or bind the <fullname>-user ClusterRole only in those namespaces" }}
{{- end }}
{{- with .Values.watchNamespace }}
{{- toYaml (dict "matchLabels" (dict "kubernetes.io/metadata.name" .)) }}
{{- end }}
{{- end }}

{{- define "analysis-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "analysis-operator.webhookService" -}}
{{- printf "%s-webhook" (include "analysis-operator.fullname" .) }}
{{- end }}

{{/* OPEN: where the gateway sends forward-auth requests (the Service templates/gateway.yaml makes). */}}
{{- define "analysis-operator.gatewayAuthUrl" -}}
{{- .Values.gateway.authUrl | default (printf "http://%s.%s.svc:%d/authorize" (include "analysis-operator.fullname" .) .Release.Namespace (int .Values.gateway.authPort)) }}
{{- end }}

{{/* OPEN: the NetworkPolicyPeers of the gateway's pods (a YAML list, never empty). */}}
{{- define "analysis-operator.gatewayPeers" -}}
{{- $default := list (dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Values.gateway.namespace))) }}
{{- toYaml (.Values.gateway.networkPolicyFrom | default $default) }}
{{- end }}

{{- define "analysis-operator.tlsSecret" -}}
{{- printf "%s-webhook-tls" (include "analysis-operator.fullname" .) }}
{{- end }}

{{/* The names the webhook serving certificate is valid for (the Service, as the API server calls it). */}}
{{- define "analysis-operator.webhookHosts" -}}
{{- $service := include "analysis-operator.webhookService" . }}
{{- printf "%s.%s.svc,%s.%s.svc.%s" $service .Release.Namespace $service .Release.Namespace (.Values.clusterDomain | default "cluster.local") }}
{{- end }}

{{/* The webhooks from files/webhooks.yaml, one kind ("validating" or "mutating"). */}}
{{- define "analysis-operator.webhooks" -}}
{{- $root := index . 0 }}{{- $kind := index . 1 }}{{- $caBundle := index . 2 }}
{{- $service := include "analysis-operator.webhookService" $root }}
{{- $conditions := $root.Files.Get "files/match-conditions.yaml" | fromYaml }}
{{- range $hook := $root.Files.Get "files/webhooks.yaml" | fromYamlArray }}
{{- if eq $hook.type $kind }}
- name: {{ printf "%s.analysis.panosc.eu" $hook.id }}
  admissionReviewVersions: [v1]
  sideEffects: {{ $hook.sideEffects | default "None" }}
  matchPolicy: Equivalent
  timeoutSeconds: {{ $root.Values.admission.timeoutSeconds }}
  failurePolicy: {{ get $root.Values.admission.failurePolicy $hook.id | default $hook.failurePolicy }}
  {{- with include "analysis-operator.servedNamespaces" $root }}
  namespaceSelector: {{- . | nindent 4 }}
  {{- end }}
  rules:
    - apiGroups: [analysis.panosc.eu]
      apiVersions: [v1alpha1]
      resources: [{{ if $hook.subresource }}{{ printf "%s/%s" $hook.resource $hook.subresource }}{{ else }}{{ $hook.resource }}{{ end }}]
      operations: {{ toJson $hook.operations }}
      scope: "*"
  {{- with get $conditions $hook.id }}
  matchConditions: {{- toYaml . | nindent 4 }}
  {{- end }}
  clientConfig:
    service:
      name: {{ $service }}
      namespace: {{ $root.Release.Namespace }}
      path: {{ printf "/%s" $hook.id }}
      port: 443
    {{- with $caBundle }}
    caBundle: {{ . }}
    {{- end }}
{{- end }}
{{- end }}
{{- end }}
