// Offline validation of sdbatch's deployment files; run through scripts/validate-manifests.sh,
// which installs the packages of package.json (exact versions, package-lock.json) with `npm ci`
// into a cache folder and runs this file from there.
//
//   node validate.mjs FILE...      (Kubernetes YAML files, a kustomization.yaml, a compose file)
//
// Every YAML document gets one line, `ok` or `FAIL`, followed by its errors with line numbers.
// Exit status 1 when any document fails. What is checked:
//
// 1. Kubernetes objects, by apiVersion/kind, against the JSON schemas that ship with the
//    `kubernetes-models` (Kubernetes' OpenAPI) and `@kubernetes-models/keda` (KEDA's CRDs)
//    packages: types (`replicas: "two"`, a number where KEDA wants a string), required fields,
//    enums and formats. Those schemas allow unknown fields, so
// 2. every key of those objects is looked up in the packages' TypeScript interfaces
//    (IDeployment, IScaledObject, ..., resolved by TypeScript's checker): unknown or misspelt
//    fields (`readinesProbe`) are errors at any depth, as with `kubectl apply`'s strict field
//    validation.
// 3. Compose files against the Compose Specification JSON schema (shipped by the `dclint`
//    package), which rejects unknown keys too.
// 4. sdbatch's own rules across files: kustomization.yaml lists every manifest of its folder;
//    YAML carried in ConfigMaps (`*.yaml` keys) parses;
//    the worker's SIGTERM grace period fits in the pod's/container's; the ScaledObject points at
//    an existing Deployment and TriggerAuthentication and reads RabbitMQ over HTTP; compose
//    depends_on names existing services, with a healthcheck where it waits for service_healthy.
// 5. Safe defaults: no example Secret (`*.example.yaml`, CHANGE-ME values) in kustomization.yaml;
//    every worker Deployment is selected by a NetworkPolicy that restricts ingress and egress,
//    lets DNS through, and opens only ports the pods have; compose publishes ports on 127.0.0.1
//    only and takes every credential from a required variable (`${VAR:?message}`), never a
//    literal or a default.
import { readFileSync, readdirSync } from "node:fs";
import { basename, dirname, join, relative, isAbsolute } from "node:path";
import { parseAllDocuments, LineCounter, isMap, isSeq, isScalar } from "yaml";
import { Ajv } from "ajv";
import ts from "typescript";

const here = import.meta.dirname;

// apiVersion group -> npm package with its models. Built-in groups come from kubernetes-models.
const CRD_PACKAGES = { "keda.sh": "@kubernetes-models/keda" };

function modelModule(apiVersion) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (group === "") return `kubernetes-models/${version}`;
  if (CRD_PACKAGES[group]) return `${CRD_PACKAGES[group]}/${group}/${version}`;
  if (!group.includes(".") || group.endsWith(".k8s.io")) return `kubernetes-models/${group}/${version}`;
  return null;
}

// ---------------------------------------------------------------------------------------------
// Reading: every document of every file, with line numbers.

const docs = []; // { file, shown, index, line, doc, lines, value, label, errors: [] }

function shownPath(file) {
  const rel = relative(process.cwd(), file);
  return rel.startsWith("..") || isAbsolute(rel) ? file : rel;
}

for (const file of process.argv.slice(2)) {
  const lines = new LineCounter();
  let text;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    docs.push({ file, shown: shownPath(file), index: 0, line: 1, label: "", errors: [{ line: 1, message: e.message }] });
    continue;
  }
  parseAllDocuments(text, { lineCounter: lines, prettyErrors: true }).forEach((doc, index) => {
    const line = doc.contents?.range ? lines.linePos(doc.contents.range[0]).line : 1;
    const entry = { file, shown: shownPath(file), index, line, doc, lines, label: "", errors: [] };
    for (const e of doc.errors) {
      const message = e.message.split("\n")[0].replace(/ at line \d+, column \d+:?$/, "");
      entry.errors.push({ line: e.linePos?.[0]?.line ?? line, message: `YAML: ${message}` });
    }
    if (doc.contents === null && entry.errors.length === 0) return; // an empty document (`---` at the end)
    if (entry.errors.length === 0) entry.value = doc.toJS({ maxAliasCount: 100 });
    docs.push(entry);
  });
}

// The line of the YAML node at `path` (or of its deepest existing parent).
function lineOf(entry, path) {
  let node = entry.doc.contents;
  let line = entry.line;
  for (const seg of path) {
    let next = null;
    if (isSeq(node)) {
      next = node.items[Number(seg)];
      if (next?.range) line = entry.lines.linePos(next.range[0]).line;
    } else if (isMap(node)) {
      const pair = node.items.find((p) => String(isScalar(p.key) ? p.key.value : p.key) === String(seg));
      if (pair?.key?.range) line = entry.lines.linePos(pair.key.range[0]).line;
      next = pair?.value ?? null;
    }
    if (!next) break;
    node = next;
  }
  return line;
}

const fail = (entry, path, message) => entry.errors.push({ line: lineOf(entry, path), path, message });
const pointer = (path) => "/" + path.join("/");
const fromPointer = (p) => (p ? p.split("/").slice(1).map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~")) : []);

// ---------------------------------------------------------------------------------------------
// 1. Kubernetes objects against the packages' JSON schemas.

const isCompose = (entry) => /(^|[-.])compose\.ya?ml$/.test(basename(entry.file));
const k8s = []; // entries checked as Kubernetes objects: { entry, spec, kind }

for (const entry of docs) {
  if (!entry.value) continue;
  const v = entry.value;
  if (isCompose(entry)) {
    entry.label = "compose";
    continue;
  }
  if (typeof v !== "object" || Array.isArray(v) || !v.apiVersion || !v.kind) {
    fail(entry, [], "not a Kubernetes object (no apiVersion/kind)");
    continue;
  }
  const name = v.metadata?.name ?? "";
  entry.label = `${v.apiVersion} ${v.kind} ${v.metadata?.namespace ? v.metadata.namespace + "/" : ""}${name}`.trim();
  if (v.kind === "Kustomization") continue; // checked in 4.
  if (!name) fail(entry, ["metadata"], "metadata.name is required");
  const spec = modelModule(v.apiVersion);
  let Model;
  try {
    Model = spec && (await import(`${spec}/${v.kind}`))[v.kind];
  } catch {
    Model = undefined;
  }
  if (!Model) {
    fail(entry, ["kind"], `no schema for ${v.apiVersion} ${v.kind} (add its @kubernetes-models package to deploy/validate)`);
    continue;
  }
  k8s.push({ entry, spec, kind: v.kind });
  try {
    new Model(v).validate();
  } catch (e) {
    if (!Array.isArray(e.errors)) throw e;
    for (const err of e.errors) {
      const path = fromPointer(err.instancePath);
      if (err.keyword === "required") path.push(err.params.missingProperty);
      const detail = err.keyword === "enum" ? ` (${err.params.allowedValues.join(", ")})` : "";
      fail(entry, path, `${pointer(path)}: ${err.message}${detail}`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2. Unknown fields. The packages' TypeScript interfaces (IDeployment, IScaledObject, ...) list
// every field; TypeScript's checker resolves them, and each YAML mapping is walked along its type.

if (k8s.length > 0) {
  const virtual = join(here, "__manifests__.ts");
  const text = k8s.map(({ spec, kind }, i) => `import type { I${kind} as T${i} } from "${spec}/${kind}";\nexport declare const doc${i}: T${i};`);
  const options = {
    noEmit: true,
    strict: true,
    skipLibCheck: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    types: [],
    lib: ["lib.es2022.d.ts"],
  };
  const host = ts.createCompilerHost(options);
  const source = ts.createSourceFile(virtual, text.join("\n"), ts.ScriptTarget.ES2022, true);
  const { getSourceFile, fileExists, readFile } = host;
  host.getSourceFile = (f, ...rest) => (f === virtual ? source : getSourceFile.call(host, f, ...rest));
  host.fileExists = (f) => f === virtual || fileExists.call(host, f);
  host.readFile = (f) => (f === virtual ? source.text : readFile.call(host, f));
  const program = ts.createProgram([virtual], options, host);
  const broken = program.getSemanticDiagnostics(source);
  if (broken.length > 0) throw new Error(`cannot load the model types: ${ts.flattenDiagnosticMessageText(broken[0].messageText, " ")}`);
  const checker = program.getTypeChecker();

  const parts = (type) => (type.isUnion() ? type.types : [type]).filter((t) => t.flags & ts.TypeFlags.Object);
  const indexType = (types, kind) => types.map((t) => checker.getIndexInfoOfType(t, kind)?.type).find(Boolean);
  const walk = (entry, node, type, path) => {
    const types = parts(checker.getNonNullableType(type));
    if (types.length === 0) return; // a scalar, `any` or `object`: nothing to compare keys with
    if (isMap(node)) {
      const anyKey = indexType(types, ts.IndexKind.String);
      for (const pair of node.items) {
        const key = String(isScalar(pair.key) ? pair.key.value : pair.key);
        const field = types.map((t) => t.getProperty(key)).find(Boolean);
        if (field) walk(entry, pair.value, checker.getTypeOfSymbol(field), [...path, key]);
        else if (anyKey) walk(entry, pair.value, anyKey, [...path, key]);
        else {
          const known = types.flatMap((t) => t.getProperties().map((p) => p.name));
          const near = known.find((k) => distance(k.toLowerCase(), key.toLowerCase()) <= 2);
          const hint = near ? `; did you mean "${near}"?` : "";
          fail(entry, [...path, key], `${pointer([...path, key])}: unknown field "${key}"${hint}`);
        }
      }
    } else if (isSeq(node)) {
      const item = indexType(types, ts.IndexKind.Number);
      if (item) node.items.forEach((n, i) => walk(entry, n, item, [...path, i]));
    }
  };
  source.statements.filter(ts.isVariableStatement).forEach((statement, i) => {
    const { entry } = k8s[i];
    walk(entry, entry.doc.contents, checker.getTypeAtLocation(statement.declarationList.declarations[0].name), []);
  });
}

// Edit distance, for "did you mean".
function distance(a, b) {
  let row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const next = [i];
    for (let j = 1; j <= b.length; j++) next[j] = Math.min(row[j] + 1, next[j - 1] + 1, row[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    row = next;
  }
  return row[b.length];
}

// ---------------------------------------------------------------------------------------------
// 3. Compose files against the Compose Specification.

const composeDocs = docs.filter((e) => e.value && e.label === "compose");
if (composeDocs.length > 0) {
  const schema = JSON.parse(readFileSync(join(here, "node_modules/dclint/schemas/compose.schema.json"), "utf8"));
  delete schema.$schema; // draft-07 under an https URI ajv does not know; ajv's default is draft-07
  const validate = new Ajv({ allErrors: true, strict: false, allowUnionTypes: true }).compile(schema);
  for (const entry of composeDocs) {
    if (validate(entry.value)) continue;
    // oneOf/anyOf report every branch they tried: an error on a value that also has an error
    // further down (`depends_on: must be array` beside the real one in depends_on.x.condition)
    // is such a branch and left out. Unknown keys are always real.
    const errors = validate.errors.filter((e) => !["oneOf", "anyOf", "if"].includes(e.keyword));
    const below = (e) => errors.some((o) => o.instancePath.startsWith(e.instancePath + "/"));
    const seen = new Set();
    for (const err of errors.filter((e) => e.keyword === "additionalProperties" || !below(e))) {
      const path = fromPointer(err.instancePath);
      let detail = "";
      if (err.keyword === "additionalProperties") {
        path.push(err.params.additionalProperty);
        detail = ` "${err.params.additionalProperty}"`;
      } else if (err.keyword === "enum") detail = ` (${err.params.allowedValues.join(", ")})`;
      const message = `${pointer(path)}: ${err.message}${detail}`;
      if (!seen.has(message)) fail(entry, path, message);
      seen.add(message);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 4. sdbatch's own rules across files.

const objects = k8s.map(({ entry }) => entry);
const find = (kind, name) => objects.find((e) => e.value.kind === kind && e.value.metadata?.name === name);
const seconds = (d) => {
  // Compose durations: 10m, 1m30s, 90s, 500ms.
  const units = { h: 3600, m: 60, s: 1, ms: 1e-3, us: 1e-6, ns: 1e-9 };
  let total = 0;
  for (const [, n, u] of String(d).matchAll(/(\d+(?:\.\d+)?)(h|ms|us|ns|m|s)/g)) total += Number(n) * units[u];
  return total;
};
const WORKER_DEFAULT_GRACE = 600; // sdbatch worker --grace-period-secs default

// Example files (`secret.example.yaml`) hold placeholder credentials: they must never be applied.
const isExample = (f) => /\.example\.ya?ml$/.test(f);
const PLACEHOLDER = /CHANGE-?ME|EXAMPLE/i;

for (const entry of docs.filter((e) => e.value?.kind === "Kustomization")) {
  const dir = dirname(entry.file);
  const resources = entry.value.resources ?? [];
  const listed = resources.filter((r) => !r.includes("/") && /\.ya?ml$/.test(r));
  const present = readdirSync(dir).filter((f) => /\.ya?ml$/.test(f) && f !== basename(entry.file));
  for (const f of present.filter((f) => !listed.includes(f) && !isExample(f))) fail(entry, ["resources"], `resources: ${f} is not listed`);
  for (const f of listed.filter((f) => !present.includes(f))) fail(entry, ["resources"], `resources: ${f} does not exist`);
  resources.forEach((f, i) => {
    if (isExample(f)) {
      fail(entry, ["resources", i], `resources: ${f} holds example values and must not be applied; create the Secrets with kubectl create secret (deploy/README.md)`);
      return;
    }
    // A Secret with placeholder values in a listed file is the same mistake under another name.
    for (const doc of docs.filter((d) => d.file === join(dir, f) && d.value?.kind === "Secret")) {
      const values = { ...(doc.value.stringData ?? {}) };
      for (const [k, v] of Object.entries(doc.value.data ?? {})) values[k] = Buffer.from(String(v), "base64").toString();
      const bad = Object.keys(values).filter((k) => PLACEHOLDER.test(String(values[k])));
      if (bad.length > 0) {
        fail(entry, ["resources", i], `resources: ${f} has a Secret ${doc.value.metadata?.name} with placeholder values (${bad.join(", ")}); create it with kubectl create secret instead`);
      }
    }
  });
}

// YAML files carried in ConfigMaps (the Prometheus scrape job) must parse.
for (const entry of objects.filter((e) => e.value.kind === "ConfigMap")) {
  for (const [key, text] of Object.entries(entry.value.data ?? {})) {
    if (!/\.ya?ml$/.test(key) || typeof text !== "string") continue;
    for (const inner of parseAllDocuments(text)) {
      for (const e of inner.errors) fail(entry, ["data", key], `data.${key}: YAML: ${e.message.split("\n")[0]}`);
    }
  }
}

for (const entry of objects.filter((e) => e.value.kind === "Deployment")) {
  const pod = entry.value.spec?.template?.spec ?? {};
  const budget = pod.terminationGracePeriodSeconds ?? 30;
  (pod.containers ?? []).forEach((c, i) => {
    const env = {};
    for (const from of c.envFrom ?? []) Object.assign(env, find("ConfigMap", from.configMapRef?.name)?.value.data ?? {});
    for (const e of c.env ?? []) if (e.value !== undefined) env[e.name] = e.value;
    if (!(c.args ?? c.command ?? []).includes("worker")) return;
    const grace = Number(env.SDBATCH_GRACE_PERIOD_SECS ?? WORKER_DEFAULT_GRACE);
    const stop = c.lifecycle?.preStop;
    const preStop = stop?.sleep?.seconds ?? (stop?.exec?.command?.[0] === "sleep" ? Number(stop.exec.command[1]) : 0);
    if (!(budget > grace + preStop)) {
      fail(entry, ["spec", "template", "spec", "terminationGracePeriodSeconds"],
        `terminationGracePeriodSeconds (${budget}) must exceed preStop (${preStop}s) + SDBATCH_GRACE_PERIOD_SECS (${grace}) of container ${c.name ?? i}: the worker would be killed while finishing its messages`);
    }
  });
}

for (const entry of objects.filter((e) => e.value.kind === "ScaledObject")) {
  const spec = entry.value.spec ?? {};
  const target = spec.scaleTargetRef ?? {};
  if ((target.kind ?? "Deployment") === "Deployment" && !find("Deployment", target.name)) {
    fail(entry, ["spec", "scaleTargetRef", "name"], `scaleTargetRef: no Deployment "${target.name}" among these files`);
  }
  (spec.triggers ?? []).forEach((t, i) => {
    const auth = t.authenticationRef;
    if (auth && (auth.kind ?? "TriggerAuthentication") === "TriggerAuthentication" && !find("TriggerAuthentication", auth.name)) {
      fail(entry, ["spec", "triggers", i, "authenticationRef", "name"], `authenticationRef: no TriggerAuthentication "${auth.name}" among these files`);
    }
    if (t.type === "rabbitmq" && t.metadata?.protocol !== "http") {
      fail(entry, ["spec", "triggers", i, "metadata"],
        "rabbitmq trigger: set protocol: http (over AMQP KEDA counts only ready messages, so workers busy with prefetched batches are scaled down)");
    }
  });
}

// Label selectors (matchLabels, matchExpressions) against a set of labels.
function selects(selector, labels) {
  if (!selector) return false;
  for (const [k, v] of Object.entries(selector.matchLabels ?? {})) if (labels[k] !== v) return false;
  for (const { key, operator, values = [] } of selector.matchExpressions ?? []) {
    const has = Object.hasOwn(labels, key);
    const ok = { In: has && values.includes(labels[key]), NotIn: !has || !values.includes(labels[key]), Exists: has, DoesNotExist: !has }[operator];
    if (!ok) return false;
  }
  return true;
}
const podsOf = (deployment) => deployment.value.spec?.template ?? {};
const namespaceOf = (e) => e.value.metadata?.namespace ?? "default";
const isWorker = (deployment) => (podsOf(deployment).spec?.containers ?? []).some((c) => (c.args ?? c.command ?? []).includes("worker"));
const policies = objects.filter((e) => e.value.kind === "NetworkPolicy");
const deployments = objects.filter((e) => e.value.kind === "Deployment");

for (const entry of policies) {
  const spec = entry.value.spec ?? {};
  const selected = deployments.filter((d) => namespaceOf(d) === namespaceOf(entry) && selects(spec.podSelector, podsOf(d).metadata?.labels ?? {}));
  if (selected.length === 0) {
    fail(entry, ["spec", "podSelector"], `podSelector selects the pods of no Deployment in namespace ${namespaceOf(entry)} among these files (compare with the Deployment's template labels)`);
  }
  // A port that no selected container has opens nothing; usually a renamed or renumbered port.
  const ports = selected.flatMap((d) => (podsOf(d).spec?.containers ?? []).flatMap((c) => c.ports ?? []));
  (spec.ingress ?? []).forEach((rule, i) =>
    (rule.ports ?? []).forEach((p, j) => {
      if (p.port === undefined || selected.length === 0) return;
      const proto = p.protocol ?? "TCP";
      const found = ports.some((c) => (c.protocol ?? "TCP") === proto && (typeof p.port === "string" && !/^\d+$/.test(p.port) ? c.name === p.port : c.containerPort === Number(p.port)));
      if (!found) fail(entry, ["spec", "ingress", i, "ports", j], `ingress port ${p.port}/${proto} is not a container port of the selected pods`);
    }),
  );
  // With Egress restricted, a pod that cannot reach DNS cannot resolve the broker or S3.
  const types = spec.policyTypes ?? (spec.egress ? ["Ingress", "Egress"] : ["Ingress"]);
  if (types.includes("Egress")) {
    for (const proto of ["UDP", "TCP"]) {
      const dns = (spec.egress ?? []).some((rule) => !rule.ports || rule.ports.some((p) => (p.protocol ?? "TCP") === proto && (p.port === undefined || Number(p.port) === 53 || (p.endPort !== undefined && Number(p.port) <= 53 && 53 <= p.endPort))));
      if (!dns) fail(entry, ["spec", "egress"], `egress: DNS (port 53/${proto}) is not allowed; the pods could not resolve the broker or S3`);
    }
  }
}

for (const entry of deployments.filter(isWorker)) {
  const labels = podsOf(entry).metadata?.labels ?? {};
  const mine = policies.filter((p) => namespaceOf(p) === namespaceOf(entry) && selects(p.value.spec?.podSelector, labels));
  const restricted = (type) => mine.some((p) => (p.value.spec?.policyTypes ?? []).includes(type));
  for (const type of ["Ingress", "Egress"].filter((t) => !restricted(t))) {
    fail(entry, ["spec", "template", "metadata", "labels"], `no NetworkPolicy with policyTypes ${type} selects the worker pods (networkpolicy.yaml)`);
  }
}

// Compose values: `${NAME:?message}` (or `${NAME?message}`) fails when NAME is missing; a literal,
// a plain `${NAME}` (empty when unset) or a `${NAME:-default}` would give every stack the same
// credentials.
const INTERPOLATION = /\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?+-])[^}]*)?\}/g;
const isRequiredVariable = (v) => {
  const m = [...String(v).matchAll(INTERPOLATION)];
  return m.length === 1 && m[0][0] === String(v).trim() && m[0][2]?.endsWith("?");
};
const CREDENTIAL_NAME = /USER|PASS|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL/i;
// A publishing address of a `ports` entry: "127.0.0.1:8080:80" -> 127.0.0.1, "8080:80" -> "".
function hostIp(port) {
  if (typeof port === "object" && port !== null) return port.host_ip ?? "";
  const s = String(port);
  const v6 = s.match(/^\[([^\]]+)\]:/);
  if (v6) return v6[1];
  const parts = s.split("/")[0].split(":");
  return parts.length === 3 ? parts[0] : "";
}
function strings(value, path, out) {
  if (typeof value === "string") out.push([value, path]);
  else if (Array.isArray(value)) value.forEach((v, i) => strings(v, [...path, i], out));
  else if (value && typeof value === "object") for (const [k, v] of Object.entries(value)) strings(v, [...path, k], out);
  return out;
}

for (const entry of composeDocs) {
  for (const [name, svc] of Object.entries(entry.value.services ?? {})) {
    (svc.ports ?? []).forEach((port, i) => {
      if (hostIp(port) !== "127.0.0.1") {
        const shown = typeof port === "object" ? JSON.stringify(port) : `"${port}"`;
        fail(entry, ["services", name, "ports", i], `services.${name}.ports: ${shown} is published on ${hostIp(port) || "all interfaces"}; bind it to 127.0.0.1 ("127.0.0.1:HOST:CONTAINER"), this stack is for the local machine`);
      }
    });
    const environment = Array.isArray(svc.environment)
      ? Object.fromEntries(svc.environment.map((kv) => kv.split(/=(.*)/s)))
      : svc.environment ?? {};
    for (const [key, value] of Object.entries(environment)) {
      if (CREDENTIAL_NAME.test(key) && !isRequiredVariable(value ?? "")) {
        fail(entry, ["services", name, "environment", key], `services.${name}.environment.${key}: a credential must come from a required variable, \${NAME:?message} (deploy/.env), not ${JSON.stringify(value ?? "")}`);
      }
    }
    for (const [text, path] of strings(svc, ["services", name], [])) {
      // Credentials inside URLs (amqp://user:pass@host): both parts from required variables.
      const plain = text.replace(INTERPOLATION, (m) => (isRequiredVariable(m) ? "$REQUIRED" : "$LITERAL"));
      for (const [, user, pass] of plain.matchAll(/[a-z][a-z0-9+.-]*:\/\/([^\s\/@:]*):([^\s\/@]*)@/gi)) {
        if (user !== "$REQUIRED" || pass !== "$REQUIRED") {
          fail(entry, path, `${path.join(".")}: credentials in a URL must come from required variables, \${NAME:?message}`);
        }
      }
      // `mc alias set ALIAS URL ACCESS_KEY SECRET_KEY` with literal keys.
      for (const [, user, pass] of text.matchAll(/mc alias set\s+\S+\s+\S+\s+(\S+)\s+(\S+)/g)) {
        if (!/^"?\$/.test(user) || !/^"?\$/.test(pass)) fail(entry, path, `${path.join(".")}: mc alias set with literal keys; take them from the environment`);
      }
      if (/\bguest:guest\b/.test(text)) fail(entry, path, `${path.join(".")}: guest/guest`);
    }
  }
}

for (const entry of composeDocs) {
  const services = entry.value.services ?? {};
  for (const [name, svc] of Object.entries(services)) {
    const deps = Array.isArray(svc.depends_on) ? Object.fromEntries(svc.depends_on.map((d) => [d, {}])) : svc.depends_on ?? {};
    for (const [dep, how] of Object.entries(deps)) {
      if (!services[dep]) fail(entry, ["services", name, "depends_on", dep], `services.${name}.depends_on: no service "${dep}"`);
      else if (how.condition === "service_healthy" && !services[dep].healthcheck) {
        fail(entry, ["services", name, "depends_on", dep], `services.${name}.depends_on.${dep}: service_healthy needs a healthcheck on "${dep}"`);
      }
    }
    const env = Array.isArray(svc.environment)
      ? Object.fromEntries(svc.environment.map((kv) => kv.split(/=(.*)/s)))
      : svc.environment ?? {};
    const command = [].concat(svc.command ?? []).join(" ");
    if (/(^|\s)worker(\s|$)/.test(command)) {
      const grace = Number(env.SDBATCH_GRACE_PERIOD_SECS ?? WORKER_DEFAULT_GRACE);
      const budget = svc.stop_grace_period === undefined ? 10 : seconds(svc.stop_grace_period);
      if (!(budget > grace)) {
        fail(entry, ["services", name, "stop_grace_period"],
          `services.${name}: stop_grace_period (${budget}s) must exceed SDBATCH_GRACE_PERIOD_SECS (${grace}): Docker would kill the worker while finishing its messages`);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Report.

let failed = 0;
for (const entry of docs) {
  const where = `${entry.shown}:${entry.line}`;
  if (entry.errors.length === 0) {
    console.log(`ok    ${where}  ${entry.label}`);
    continue;
  }
  failed++;
  console.log(`FAIL  ${where}  ${entry.label}`);
  const seen = new Set();
  for (const e of entry.errors.sort((a, b) => a.line - b.line)) {
    const text = `      ${entry.shown}:${e.line}: ${e.message}`;
    if (!seen.has(text)) console.log(text);
    seen.add(text);
  }
}
console.log(`manifests: ${docs.length - failed} passed, ${failed} failed`);
process.exit(failed > 0 ? 1 : 0);
