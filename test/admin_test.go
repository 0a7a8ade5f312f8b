package test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func TestAdminEndpointsAndMetrics(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/boom" {
			w.WriteHeader(503)
		}
		io.WriteString(w, "upstream:"+r.URL.Path)
	})
	sc := startSidecar(t, routeTo(be.url(), ""))
	for i := 0; i < 7; i++ {
		resp, err := http.Get(sc.url("/x"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	resp, _ := http.Post(sc.url("/boom"), "text/plain", strings.NewReader("12345"))
	resp.Body.Close()

	// The admin paths on the proxy port are the upstream's, not ours.
	resp, err := http.Get(sc.url("/metrics"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "upstream:/metrics" {
		t.Errorf("/metrics on the proxy port answered %q", b)
	}

	for path, want := range map[string]int{"/healthz": 200, "/readyz": 200, "/nope": 404} {
		resp, err := http.Get("http://" + sc.Admin + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("admin %s = %d, want %d", path, resp.StatusCode, want)
		}
	}

	resp, err = http.Get("http://" + sc.Admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse as Prometheus text: %v", err)
	}
	value := func(name string, labels map[string]string) float64 {
		mf, ok := families[name]
		if !ok {
			t.Errorf("metric %s missing", name)
			return -1
		}
	next:
		for _, m := range mf.Metric {
			for _, lp := range m.Label {
				if want, ok := labels[lp.GetName()]; ok && want != lp.GetValue() {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount())
			case m.Untyped != nil:
				return m.Untyped.GetValue()
			}
		}
		return -1
	}
	if v := value("sidecar_requests_total", map[string]string{"route": "app", "method": "GET", "status_class": "2xx"}); v != 8 {
		t.Errorf("GET 2xx requests = %v, want 8 (7 and the proxied /metrics)", v)
	}
	if v := value("sidecar_requests_total", map[string]string{"route": "app", "method": "POST", "status_class": "5xx"}); v != 1 {
		t.Errorf("POST 5xx requests = %v, want 1", v)
	}
	if v := value("sidecar_request_duration_seconds", map[string]string{"route": "app"}); v != 9 {
		t.Errorf("duration histogram count = %v, want 9", v)
	}
	if v := value("sidecar_request_body_bytes_total", map[string]string{"route": "app"}); v != 5 {
		t.Errorf("request bytes = %v, want 5", v)
	}
	if v := value("sidecar_response_body_bytes_total", map[string]string{"route": "app"}); v < float64(7*len("upstream:/x")) {
		t.Errorf("response bytes = %v", v)
	}
	if v := value("sidecar_active_clients", map[string]string{"tier": "anonymous", "window": "5m"}); v != 1 {
		t.Errorf("active anonymous clients over 5m = %v, want 1 (all requests came from 127.0.0.1)", v)
	}
	if v := value("sidecar_upstream_duration_seconds", map[string]string{"upstream": "app"}); v != 9 {
		t.Errorf("upstream duration histogram count = %v, want 9", v)
	}
	if v := value("sidecar_added_latency_seconds", map[string]string{"route": "app"}); v != 9 {
		t.Errorf("added latency histogram count = %v, want 9", v)
	}
	for _, name := range []string{"sidecar_requests_in_flight", "sidecar_open_connections", "sidecar_build_info",
		"sidecar_runtime_lag_seconds", "sidecar_runtime_lag_probe_seconds",
		"go_sched_latencies_seconds", "go_goroutines", "process_resident_memory_bytes", "go_memlimit_bytes"} {
		if _, ok := families[name]; !ok {
			t.Errorf("metric %s missing", name)
		}
	}
	if mf := families["sidecar_request_duration_seconds"]; mf != nil && mf.GetType().String() != "HISTOGRAM" {
		t.Errorf("request duration is %s, want a Prometheus histogram with le buckets", mf.GetType())
	}
}

func TestCommandLine(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.toml")
	os.WriteFile(good, []byte(routeTo("http://127.0.0.1:3000", "")), 0o600)
	bad := filepath.Join(dir, "bad.toml")
	os.WriteFile(bad, []byte(`[server]
listen = "127.0.0.1:8080"
idle_timeout = "soon"

[upstreams.app]
url = "ftp://x"

[[routes]]
upstream = "app"

[[routes]]
path_prefix = "nope"
upstream = "missing"
`), 0o600)
	typo := filepath.Join(dir, "typo.toml")
	os.WriteFile(typo, []byte("[server]\nlisen = \"x\"\n\n[upstreams.app]\nurl = \"http://a:1\"\nconect_timeout = \"1s\"\n"), 0o600)

	run := func(args ...string) (string, int) {
		cmd := exec.Command(sidecarBin, args...)
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	if out, code := run("-version"); code != 0 || !strings.HasPrefix(out, "sidecar ") {
		t.Errorf("-version: %d %q", code, out)
	}
	if out, code := run("-validate", "-config", good); code != 0 || !strings.Contains(out, "ok") || !strings.Contains(out, "route app: path_prefix / -> app") {
		t.Errorf("-validate good: %d %q", code, out)
	}
	out, code := run("-validate", "-config", bad)
	if code == 0 {
		t.Errorf("-validate bad config exited 0")
	}
	if want := bad + ":3:16: server.idle_timeout: "; !strings.Contains(out, want) || !strings.Contains(out, `invalid duration "soon"`) {
		t.Errorf("-validate output lacks %q:\n%s", want, out)
	}
	// Strict decoding stops at the first type error; fix it and the
	// validator reports every remaining problem at once.
	os.WriteFile(bad, []byte(strings.Replace(mustRead(t, bad), `"soon"`, `"5s"`, 1)), 0o600)
	out, _ = run("-validate", "-config", bad)
	for _, want := range []string{
		bad + ":6:1: upstreams.app.url: \"ftp://x\": scheme must be http",
		":12:1: routes[1].path_prefix: must start with '/'",
		":13:1: routes[1].upstream: unknown upstream \"missing\"",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("-validate output lacks %q:\n%s", want, out)
		}
	}
	out, code = run("-validate", "-config", typo)
	if code == 0 || !strings.Contains(out, ":2:1: server.lisen: unknown key") || !strings.Contains(out, ":6:1: upstreams.app.conect_timeout: unknown key") {
		t.Errorf("unknown keys: %d\n%s", code, out)
	}
	if out, code := run("-config", filepath.Join(dir, "absent.toml")); code == 0 || !strings.Contains(out, "absent.toml") {
		t.Errorf("missing config: %d %q", code, out)
	}
	if out, code := run("-config", bad); code == 0 || !strings.Contains(out, "not started") {
		t.Errorf("bad config at start: %d %q", code, out)
	}
	if _, code := run("-no-such-flag"); code != 2 {
		t.Errorf("unknown flag exit %d, want 2", code)
	}
}

func mustRead(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestMemoryLimitFromEnvironmentWins(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	addrs := freeAddrs(t, 2)
	s := &sidecar{t: t, Addr: addrs[0], Admin: addrs[1], logs: &syncBuffer{}, waited: make(chan struct{})}
	s.Config = filepath.Join(t.TempDir(), "sidecar.toml")
	s.writeConfig(routeTo(be.url(), ""))
	s.run([]string{"GOMEMLIMIT=200MiB"})
	if v := s.metric("go_memlimit_bytes"); v != 200<<20 {
		t.Errorf("go_memlimit_bytes = %v, want 200 MiB", v)
	}
	if !strings.Contains(s.logs.String(), `"gomemlimit_source":"GOMEMLIMIT environment variable"`) {
		t.Errorf("start-up log does not say where the memory limit came from:\n%s", s.logs.String())
	}
}

func TestEnvironmentOverridesAndHealthcheck(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "sidecar.toml")
	os.WriteFile(cfg, []byte(routeTo("http://127.0.0.1:3000", "")), 0o600)
	run := func(env []string, args ...string) (string, int) {
		cmd := exec.Command(sidecarBin, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), ee.ExitCode()
		}
		return string(out), 0
	}
	out, code := run([]string{"SIDECAR_LISTEN=0.0.0.0:8181", "SIDECAR_ADMIN_LISTEN=0.0.0.0:9191", "SIDECAR_UPSTREAM_URL=http://app:8000"},
		"-validate", "-config", cfg)
	if code != 0 || !strings.Contains(out, "listen 0.0.0.0:8181, admin 0.0.0.0:9191") || !strings.Contains(out, "upstream app: http://app:8000") {
		t.Errorf("-validate with overrides: %d\n%s", code, out)
	}
	two := filepath.Join(dir, "two.toml")
	os.WriteFile(two, []byte(routeTo("http://127.0.0.1:3000", "")+"[upstreams.other]\nurl = \"http://127.0.0.1:3001\"\n"), 0o600)
	if out, code := run([]string{"SIDECAR_UPSTREAM_URL=http://app:8000"}, "-validate", "-config", two); code == 0 || !strings.Contains(out, "SIDECAR_UPSTREAM_URL") {
		t.Errorf("ambiguous SIDECAR_UPSTREAM_URL accepted: %d\n%s", code, out)
	}

	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, routeTo(be.url(), ""))
	if out, code := run(nil, "-healthcheck", "-config", sc.Config); code != 0 {
		t.Errorf("-healthcheck against a running sidecar: %d %s", code, out)
	}
	os.WriteFile(cfg, []byte(fmt.Sprintf("[server]\nadmin_listen = %q\n", freeAddr(t))+routeTo("http://127.0.0.1:3000", "")), 0o600)
	if _, code := run(nil, "-healthcheck", "-config", cfg); code == 0 {
		t.Errorf("-healthcheck succeeded with nothing listening")
	}
}

// Two processes share the proxy port with reuse_port: a new process can
// start before the old one drains.
func TestReusePortHandover(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	cfg := "[server]\nreuse_port = true\n" + routeTo(be.url(), "")
	old := startSidecar(t, cfg)
	next := &sidecar{t: t, Addr: old.Addr, Admin: freeAddr(t), logs: &syncBuffer{}, waited: make(chan struct{})}
	next.Config = filepath.Join(t.TempDir(), "sidecar.toml")
	next.writeConfig(cfg)
	next.run(nil)
	old.signal(syscall.SIGTERM)
	if code := old.wait(10 * time.Second); code != 0 {
		t.Fatalf("old process exit %d", code)
	}
	for i := 0; i < 10; i++ {
		if resp, body := get(t, old.url("/"), nil); resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("after the handover: %d %q", resp.StatusCode, body)
		}
	}
}
