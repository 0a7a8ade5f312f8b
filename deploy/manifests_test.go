// Package deploy checks the example manifests: every Kubernetes object in
// deploy/kubernetes decodes strictly into its API type (a typo in a field
// name fails), the kustomization lists files that exist, and the
// ConfigMap's sidecar.toml is a valid sidecar config; the alert rules pass
// their promtool unit tests; the Grafana dashboard's layout is sound.
//
// It is its own Go module so that the sidecar binary does not depend on
// the Kubernetes API packages; `make test` runs it explicitly.
package deploy

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"

	"github.com/sidecar-proxy/sidecar/policy"
)

func TestManifestsDecodeStrictly(t *testing.T) {
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests: %v", err)
	}
	kinds := map[string]int{}
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range bytes.Split(raw, []byte("\n---\n")) {
			var meta struct{ Kind string }
			if err := yaml.Unmarshal(doc, &meta); err != nil {
				t.Fatalf("%s document %d: %v", f, i, err)
			}
			var obj any
			switch meta.Kind {
			case "Deployment":
				obj = &appsv1.Deployment{}
			case "Service":
				obj = &corev1.Service{}
			case "ConfigMap":
				obj = &corev1.ConfigMap{}
			case "PodDisruptionBudget":
				obj = &policyv1.PodDisruptionBudget{}
			case "Kustomization":
				obj = &struct {
					APIVersion string   `json:"apiVersion"`
					Kind       string   `json:"kind"`
					Resources  []string `json:"resources"`
				}{}
			default:
				t.Errorf("%s document %d: unexpected kind %q", f, i, meta.Kind)
				continue
			}
			if err := yaml.UnmarshalStrict(doc, obj); err != nil {
				t.Errorf("%s document %d (%s): %v", f, i, meta.Kind, err)
				continue
			}
			kinds[meta.Kind]++
			switch o := obj.(type) {
			case *corev1.ConfigMap:
				if _, err := policy.Parse(f+": data.sidecar.toml", []byte(o.Data["sidecar.toml"])); err != nil {
					t.Errorf("the ConfigMap's sidecar.toml is invalid:\n%v", err)
				}
			case *appsv1.Deployment:
				checkPod(t, f, &o.Spec.Template.Spec)
			}
		}
	}
	for _, k := range []string{"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Kustomization"} {
		if kinds[k] == 0 {
			t.Errorf("no %s among the manifests", k)
		}
	}
	var kust struct{ Resources []string }
	raw, _ := os.ReadFile("kubernetes/kustomization.yaml")
	_ = yaml.Unmarshal(raw, &kust)
	for _, r := range kust.Resources {
		if _, err := os.Stat(filepath.Join("kubernetes", r)); err != nil {
			t.Errorf("kustomization lists %s: %v", r, err)
		}
	}
}

// checkPod: the sidecar has probes on the admin port, limits, and a
// restrictive security context.
func checkPod(t *testing.T, file string, pod *corev1.PodSpec) {
	t.Helper()
	for _, c := range append(append([]corev1.Container{}, pod.InitContainers...), pod.Containers...) {
		if c.Resources.Limits.Memory().IsZero() {
			t.Errorf("%s: container %s has no memory limit", file, c.Name)
		}
		if sc := c.SecurityContext; sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s: container %s allows privilege escalation", file, c.Name)
		}
		if c.Name != "sidecar" {
			continue
		}
		if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" ||
			c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil || c.LivenessProbe.HTTPGet.Path != "/healthz" {
			t.Errorf("%s: the sidecar needs /readyz and /healthz probes", file)
		}
		if strings.Contains(file, "deployment.yaml") && (c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways) {
			t.Errorf("%s: the native sidecar needs restartPolicy: Always", file)
		}
	}
}

func TestComposeExample(t *testing.T) {
	if _, err := policy.Load("docker-compose/sidecar.toml"); err != nil {
		t.Errorf("docker-compose/sidecar.toml:\n%v", err)
	}
	raw, err := os.ReadFile("docker-compose/docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	var compose struct {
		Services map[string]struct {
			Ports []string `json:"ports"`
		} `json:"services"`
	}
	if err := yaml.Unmarshal(raw, &compose); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"legacy", "redis", "sidecar", "prometheus"} {
		if _, ok := compose.Services[name]; !ok {
			t.Errorf("no %s service", name)
		}
	}
	if len(compose.Services["legacy"].Ports) != 0 {
		t.Errorf("the legacy app publishes ports: clients must go through the sidecar")
	}
}

// The alert rules' unit tests pass (promtool test rules, on synthetic
// series), and they test what they claim: every alert they name is a rule
// in alerts.yml (a misspelt name would pass any "not firing" case), and
// each is shown both firing and not firing.
func TestAlertRuleUnitTests(t *testing.T) {
	out, err := exec.Command("promtool", "test", "rules", "prometheus/alerts_test.yml").CombinedOutput()
	if err != nil {
		t.Fatalf("promtool test rules (make test installs Debian's prometheus): %v\n%s", err, out)
	}
	var rules struct {
		Groups []struct {
			Rules []struct{ Alert string }
		}
	}
	var tests struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string
				ExpAlerts []any `json:"exp_alerts"`
			} `json:"alert_rule_test"`
		}
	}
	for file, v := range map[string]any{"prometheus/alerts.yml": &rules, "prometheus/alerts_test.yml": &tests} {
		raw, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal(raw, v); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
	}
	alerts := map[string]bool{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			alerts[r.Alert] = true
		}
	}
	firing, quiet := map[string]int{}, map[string]int{}
	for _, tc := range tests.Tests {
		for _, c := range tc.AlertRuleTest {
			if !alerts[c.Alertname] {
				t.Errorf("alerts_test.yml tests %q, which is no alert in alerts.yml", c.Alertname)
			}
			if len(c.ExpAlerts) > 0 {
				firing[c.Alertname]++
			} else {
				quiet[c.Alertname]++
			}
		}
	}
	for _, name := range []string{"SidecarSheddingProtectedTier", "SidecarHighShedRatio"} {
		if firing[name] == 0 || quiet[name] == 0 {
			t.Errorf("alerts_test.yml: %s is shown firing in %d cases and not firing in %d; want both", name, firing[name], quiet[name])
		}
	}
	for name := range firing {
		if quiet[name] == 0 {
			t.Errorf("alerts_test.yml: %s is never shown not firing", name)
		}
	}
}

// The Grafana dashboard: panel ids unique, panels inside the 24-column
// grid and not overlapping, and every panel and query on the datasource
// variable.
func TestDashboard(t *testing.T) {
	raw, err := os.ReadFile("grafana/sidecar-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	type source struct{ Type, UID string }
	var dash struct {
		Templating struct {
			List []struct{ Name, Type string }
		}
		Panels []struct {
			ID         int
			Type       string
			Title      string
			Datasource *source
			GridPos    struct{ H, W, X, Y int }
			Targets    []struct {
				Datasource *source
				Expr       string
				RefID      string
			}
		}
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard is not JSON: %v", err)
	}
	hasVar := false
	for _, v := range dash.Templating.List {
		hasVar = hasVar || v.Name == "datasource" && v.Type == "datasource"
	}
	if !hasVar {
		t.Errorf("no datasource template variable")
	}
	onVar := func(s *source) bool { return s != nil && s.Type == "prometheus" && s.UID == "${datasource}" }
	ids := map[int]string{}
	for i, p := range dash.Panels {
		if p.ID <= 0 || ids[p.ID] != "" {
			t.Errorf("panel %q: id %d is not a unique positive id (also %q)", p.Title, p.ID, ids[p.ID])
		}
		ids[p.ID] = p.Title
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.Y < 0 || g.X+g.W > 24 {
			t.Errorf("panel %q: gridPos %+v outside the 24-column grid", p.Title, g)
		}
		for _, q := range dash.Panels[:i] {
			o := q.GridPos
			if g.X < o.X+o.W && o.X < g.X+g.W && g.Y < o.Y+o.H && o.Y < g.Y+g.H {
				t.Errorf("panels %q and %q overlap: %+v, %+v", p.Title, q.Title, g, o)
			}
		}
		if p.Type == "row" {
			continue
		}
		if !onVar(p.Datasource) || len(p.Targets) == 0 {
			t.Errorf("panel %q: datasource %+v, %d queries; want the datasource variable and a query", p.Title, p.Datasource, len(p.Targets))
		}
		refs := map[string]bool{}
		for _, tg := range p.Targets {
			if !onVar(tg.Datasource) || tg.Expr == "" || tg.RefID == "" || refs[tg.RefID] {
				t.Errorf("panel %q: query %q (refId %q, datasource %+v): want the datasource variable, an expr and a unique refId",
					p.Title, tg.Expr, tg.RefID, tg.Datasource)
			}
			refs[tg.RefID] = true
		}
	}
}
