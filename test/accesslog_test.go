package test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestAccessLog(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	dir := t.TempDir()
	writeKeys(t, dir)
	sc := startSidecarIn(t, dir, `
[identity]
api_keys_file = "keys.toml"
[tiers.anonymous]
limit = 2
window = "1m"
[tiers.premium]
limit = 100
window = "1m"
[access_log]
enabled = true
sample = 0.0
fingerprint_secret_env = "SIDECAR_TEST_LOG_SECRET"
`+routeTo(be.url(), ""), "SIDECAR_TEST_LOG_SECRET=0123456789abcdef-test")
	get(t, sc.url("/ok"), nil)                                                // success: sampled out
	get(t, sc.url("/ok"), nil)                                                // success: sampled out
	get(t, sc.url("/denied"), nil)                                            // 429: always logged
	get(t, sc.url("/key"), map[string]string{"X-API-Key": "unknown-key-123"}) // 401: always logged
	var lines []map[string]any
	deadline := time.Now().Add(3 * time.Second)
	for len(lines) < 2 && time.Now().Before(deadline) {
		lines = lines[:0]
		for _, l := range strings.Split(sc.logs.String(), "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "request" {
				lines = append(lines, m)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(lines) != 2 {
		t.Fatalf("want 2 access lines (the 429 and the 401, successes sampled out), got %d:\n%s", len(lines), sc.logs.String())
	}
	denied := lines[0]
	if denied["status"] != float64(429) || denied["route"] != "app" || denied["tier"] != "anonymous" ||
		denied["limit"] != "denied" || denied["request_id"] == "" {
		t.Errorf("429 line: %v", denied)
	}
	fp, _ := denied["client"].(string)
	if len(fp) != 16 || strings.Contains(fp, "127.0.0.1") {
		t.Errorf("client fingerprint %q: want 16 hex digits, never the address", fp)
	}
	if denied["breaker"] != "" { // denied before the upstream was chosen
		t.Errorf("breaker field on a denial: %v", denied["breaker"])
	}
	if lines[1]["status"] != float64(401) {
		t.Errorf("401 line: %v", lines[1])
	}
	if strings.Contains(sc.logs.String(), "unknown-key-123") {
		t.Errorf("an API key reached the logs")
	}
	if v := sc.metric(`sidecar_access_log_dropped_total`); v != 0 {
		t.Errorf("dropped %v lines", v)
	}
}

func TestAccessLogSuccessLine(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("hello")) })
	// The operational log set to errors only: the access log has its own
	// switch and keeps logging.
	sc := startSidecar(t, "[access_log]\nenabled = true\n"+routeTo(be.url(), ""), "-log-level", "error")
	get(t, sc.url("/x"), nil)
	var line map[string]any
	deadline := time.Now().Add(3 * time.Second)
	for line == nil && time.Now().Before(deadline) {
		for _, l := range strings.Split(sc.logs.String(), "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "request" {
				line = m
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if line == nil {
		t.Fatal("no access line for a successful request with sample = 1.0")
	}
	if line["status"] != float64(200) || line["method"] != "GET" || line["upstream"] != be.Addr ||
		line["breaker"] != "closed" || line["bytes_out"] != float64(5) || line["tier"] != "anonymous" {
		t.Errorf("success line: %v", line)
	}
	if d, _ := line["duration_ms"].(float64); d <= 0 {
		t.Errorf("duration_ms %v", line["duration_ms"])
	}
}

// Under load the access log writes lines in batches: every request still
// gets exactly one line, and every line is whole JSON.
func TestAccessLogBatchesWholeLines(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, "[access_log]\nenabled = true\n"+routeTo(be.url(), ""), "-log-level", "error")
	const workers, each = 8, 250
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				if resp, err := http.Get(sc.url("/batch")); err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
		}()
	}
	wg.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for {
		requests, broken := 0, 0
		for _, l := range strings.Split(sc.logs.String(), "\n") {
			if l == "" {
				continue
			}
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) != nil {
				broken++
			} else if m["msg"] == "request" {
				requests++
			}
		}
		if broken != 0 {
			t.Fatalf("%d access-log lines are not whole JSON lines", broken)
		}
		if requests == workers*each {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d access lines for %d requests", requests, workers*each)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Lines still waiting for their batch when the process stops are written
// before it exits: a drain loses no access-log line. The last request is
// in flight at SIGTERM and ends during the drain, just before the access
// log is closed: its line is in the middle of its batch interval then.
func TestAccessLogWrittenOnShutdown(t *testing.T) {
	release := make(chan struct{})
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/in-flight" {
			<-release
		}
	})
	sc := startSidecar(t, "[server]\ndrain_delay = \"0s\"\n[access_log]\nenabled = true\n"+routeTo(be.url(), ""), "-log-level", "error")
	countLines := func() int {
		lines := 0
		for _, l := range strings.Split(sc.logs.String(), "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "request" {
				lines++
			}
		}
		return lines
	}
	const n = 20
	for i := 0; i < n; i++ {
		get(t, sc.url("/before-term"), nil)
	}
	// Their batch is written: the in-flight request's line starts the next.
	for deadline := time.Now().Add(5 * time.Second); countLines() < n; {
		if time.Now().After(deadline) {
			t.Fatalf("%d access lines for %d requests", countLines(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	inFlight := make(chan int, 1)
	go func() {
		resp, err := http.Get(sc.url("/in-flight"))
		if err != nil {
			inFlight <- 0
			return
		}
		resp.Body.Close()
		inFlight <- resp.StatusCode
	}()
	for deadline := time.Now().Add(5 * time.Second); be.lastRequest() == nil || be.lastRequest().URL.Path != "/in-flight"; {
		if time.Now().After(deadline) {
			t.Fatal("the in-flight request never reached the backend")
		}
		time.Sleep(5 * time.Millisecond)
	}
	sc.signal(syscall.SIGTERM)
	time.Sleep(50 * time.Millisecond) // the drain has begun
	close(release)
	released := time.Now()
	if code := <-inFlight; code != 200 {
		t.Fatalf("in-flight request: status %d", code)
	}
	if code := sc.wait(15 * time.Second); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	// Under the batch interval (100 ms), so the last line was written by
	// the close, not by its timer.
	t.Logf("exited %v after the last request was released", time.Since(released))
	if lines := countLines(); lines != n+1 {
		t.Fatalf("%d access lines after shutdown for %d requests", lines, n+1)
	}
}
