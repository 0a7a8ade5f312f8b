package breaker

import (
	"fmt"
	"testing"
	"time"
)

// The breaker's cost per request on a healthy upstream: Allow, Report,
// Done. hystrix's health computation (IsOpen) is most of it; it runs once
// per request.
func BenchmarkAllowReport(b *testing.B) {
	br, err := New(Settings{Name: fmt.Sprintf("bench-allow-%d", time.Now().UnixNano())}, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		now := time.Now()
		tk, _, err := br.Allow(now)
		if err != nil {
			b.Fatal(err)
		}
		tk.Report(false, now)
		tk.Done()
	}
}

// State is asked for every access-log line.
func BenchmarkState(b *testing.B) {
	br, err := New(Settings{Name: fmt.Sprintf("bench-state-%d", time.Now().UnixNano())}, nil)
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now()
	for range 100 { // past the volume threshold: hystrix computes health
		tk, _, _ := br.Allow(now)
		tk.Report(false, now)
		tk.Done()
	}
	for b.Loop() {
		if br.State(time.Now()) != Closed {
			b.Fatal("not closed")
		}
	}
}
