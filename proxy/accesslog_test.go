package proxy

import (
	"bytes"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// writeRecorder is the access log's destination in these tests: it keeps
// every write apart, so a test can count them.
type writeRecorder struct {
	mu     sync.Mutex
	writes []string
}

func (w *writeRecorder) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writes = append(w.writes, string(p))
	return len(p), nil
}

func (w *writeRecorder) snapshot() (writes int, lines []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.writes {
		if !strings.HasSuffix(s, "\n") {
			lines = append(lines, "write not ending in a whole line: "+s)
		}
		lines = append(lines, strings.Split(strings.TrimSuffix(s, "\n"), "\n")...)
	}
	return len(w.writes), lines
}

// A burst of lines shares writes instead of costing one each, nothing is
// lost, and the lines come out in the order they were offered.
func TestAccessLogBurstSharesWrites(t *testing.T) {
	out := &writeRecorder{}
	a := newAccessLog(out, metrics.NewSet(), func() []byte { return nil })
	const lines = 3000 // under half the buffer: no early flush, one interval
	for i := range lines {
		a.offer(accessEntry{requestID: strconv.Itoa(i), status: 200})
	}
	deadline := time.Now().Add(5 * time.Second)
	var writes int
	var got []string
	for {
		writes, got = out.snapshot()
		if len(got) >= lines || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	a.close()
	if len(got) != lines {
		t.Fatalf("%d lines written of %d", len(got), lines)
	}
	for i, l := range got {
		if !strings.Contains(l, `"request_id":"`+strconv.Itoa(i)+`"`) {
			t.Fatalf("line %d is %s", i, l)
		}
	}
	// 3000 lines of ~300 bytes are ~14 batches of 64 KiB at most; one per
	// line would be 3000.
	if max := lines*400/accessLogBatch + 2; writes > max {
		t.Errorf("%d writes for %d lines, want at most %d", writes, lines, max)
	}
	t.Logf("%d lines in %d writes", lines, writes)
}

// More lines than half the buffer holds do not wait for the interval:
// the writer is hurried, and nothing is dropped.
func TestAccessLogHalfFullBufferFlushesEarly(t *testing.T) {
	out := &writeRecorder{}
	set := metrics.NewSet()
	// The interval is an hour here: only the hurry signal of a half-full
	// buffer can get these lines written while the test waits.
	a := newAccessLogFlushing(out, set, func() []byte { return nil }, time.Hour)
	defer a.close()
	for i := range accessLogBuffer/2 + 1 {
		a.offer(accessEntry{requestID: strconv.Itoa(i), status: 200})
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, got := out.snapshot(); len(got) == accessLogBuffer/2+1 {
			break
		}
		if time.Now().After(deadline) {
			_, got := out.snapshot()
			t.Fatalf("%d lines written of %d", len(got), accessLogBuffer/2+1)
		}
		time.Sleep(5 * time.Millisecond)
	}
	var dropped bytes.Buffer
	set.WritePrometheus(&dropped)
	if !strings.Contains(dropped.String(), "sidecar_access_log_dropped_total 0") {
		t.Errorf("lines dropped: %s", dropped.String())
	}
}

// Closing the log writes what is queued at once, without waiting for the
// interval.
func TestAccessLogCloseFlushes(t *testing.T) {
	out := &writeRecorder{}
	a := newAccessLog(out, metrics.NewSet(), func() []byte { return nil })
	time.Sleep(10 * time.Millisecond)
	for i := range 10 {
		a.offer(accessEntry{requestID: strconv.Itoa(i), status: 200})
	}
	a.close()
	if _, got := out.snapshot(); len(got) != 10 {
		t.Fatalf("%d lines after close, want 10", len(got))
	}
}

// The writer goroutine's cost per line: encoding (with the client's
// fingerprint) into a batch; the batch's "time" is formatted once.
func BenchmarkAccessLogWrite(b *testing.B) {
	key := []byte("k")
	a := &accessLog{secret: func() []byte { return key }}
	now := time.Now()
	e := accessEntry{at: now, requestID: "3e12f4283e5c-1", route: "app", method: "GET", status: 200, tier: "anonymous",
		client: "ip:10.0.0.1", limit: "allowed", breaker: "closed", endpoint: "127.0.0.1:3000",
		duration: 650 * time.Microsecond, upstream: 400 * time.Microsecond, bytesOut: 13}
	b.ReportAllocs()
	for b.Loop() {
		if a.batch.Len() > accessLogBatch {
			a.batch.Reset()
		}
		a.write(e, now)
	}
}
