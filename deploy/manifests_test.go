// Package deploy checks the example manifests: every Kubernetes object in
// deploy/kubernetes decodes strictly into its API type (a typo in a field
// name fails), the kustomization lists files that exist, and the
// ConfigMap's sidecar.toml is a valid sidecar config.
//
// It is its own Go module so that the sidecar binary does not depend on
// the Kubernetes API packages; `make test` runs it explicitly.
package deploy

import (
	"bytes"
	"os"
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
