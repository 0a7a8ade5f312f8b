package breaker

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

// waitOpen reports failures until the circuit refuses, and returns how
// many requests it admitted after the thresholds were crossed. The loop
// waits for the state (it stops when the circuit refuses) and runs as fast
// as it can: hystrix alone, applying events on its own goroutine, let
// dozens through here; the breaker's synchronous count must not.
func waitOpen(t *testing.T, b *Breaker, volume int) int {
	t.Helper()
	for i := 0; i < volume; i++ {
		tk, _, err := b.Allow(time.Now())
		if err != nil {
			t.Fatalf("refused before the volume threshold: %v", err)
		}
		tk.Report(true, time.Now())
		tk.Done()
	}
	late := 0
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		tk, _, err := b.Allow(time.Now())
		if errors.Is(err, ErrOpen) {
			return late
		}
		if err != nil {
			t.Fatal(err)
		}
		late++
		tk.Report(true, time.Now())
		tk.Done()

	}
	t.Fatalf("circuit never opened (%d late requests)", late)
	return late
}

func TestCircuitOpensWithinAHandfulOfRequests(t *testing.T) {
	worst := 0
	for rep := 0; rep < 100; rep++ {
		b, err := New(Settings{Name: fmt.Sprintf("test-open-%d-%d", time.Now().UnixNano(), rep), VolumeThreshold: 10, ErrorPercent: 50, SleepWindow: time.Minute}, nil)
		if err != nil {
			t.Fatal(err)
		}
		worst = max(worst, waitOpen(t, b, 10))
	}
	t.Logf("worst case over 100 repetitions: %d requests reached the failing upstream after the thresholds were crossed", worst)
	if worst > 1 {
		t.Errorf("%d requests got through after the thresholds were crossed", worst)
	}
}

func TestOnlyTheProbeClosesTheCircuit(t *testing.T) {
	var transitions []State
	b, _ := New(Settings{Name: fmt.Sprintf("test-probe-%d", time.Now().UnixNano()), VolumeThreshold: 5, SleepWindow: 200 * time.Millisecond}, func(s State) { transitions = append(transitions, s) })
	inFlight, _, err := b.Allow(time.Now()) // started before the trip
	if err != nil {
		t.Fatal(err)
	}
	waitOpen(t, b, 5)
	inFlight.Report(false, time.Now()) // a late success
	inFlight.Done()
	if _, _, err := b.Allow(time.Now()); !errors.Is(err, ErrOpen) {
		t.Fatalf("a success that started before the trip closed the circuit: %v", err)
	}
	if st := b.State(time.Now()); st != Open {
		t.Errorf("state %v, want open", st)
	}
	_, retry, _ := b.Allow(time.Now())
	if retry <= 0 || retry > time.Second {
		t.Errorf("retry-in %v", retry)
	}
	// After the sleep window one probe goes through; its success closes.
	deadline := time.Now().Add(5 * time.Second)
	var probe Ticket
	for {
		tk, _, err := b.Allow(time.Now())
		if err == nil {
			probe = tk
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no probe after the sleep window")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, _, err := b.Allow(time.Now()); !errors.Is(err, ErrOpen) {
		t.Errorf("a second request went through while the probe was out: %v", err)
	}
	probe.Report(false, time.Now())
	probe.Done()
	if tk, _, err := b.Allow(time.Now()); err != nil {
		t.Errorf("closed circuit refused: %v", err)
	} else {
		tk.Done()
	}
	if len(transitions) != 2 || transitions[0] != Open || transitions[1] != Closed {
		t.Errorf("transitions %v, want [open closed]", transitions)
	}
}

func TestBulkheadRejectsAtOnceAndIsNotAFailure(t *testing.T) {
	b, _ := New(Settings{Name: fmt.Sprintf("test-bulkhead-%d", time.Now().UnixNano()), MaxConcurrent: 2, VolumeThreshold: 5}, nil)
	a, _, _ := b.Allow(time.Now())
	c, _, _ := b.Allow(time.Now())
	for i := 0; i < 50; i++ {
		start := time.Now()
		if _, _, err := b.Allow(time.Now()); !errors.Is(err, ErrSaturated) {
			t.Fatalf("third concurrent request: %v", err)
		}
		if d := time.Since(start); d > 10*time.Millisecond {
			t.Errorf("rejection waited %v", d)
		}
	}
	a.Report(false, time.Now())
	a.Done()
	c.Report(false, time.Now())
	c.Done()
	time.Sleep(50 * time.Millisecond)
	if st := b.State(time.Now()); st != Closed {
		t.Errorf("50 bulkhead rejections changed the circuit to %v", st)
	}
	if tk, _, err := b.Allow(time.Now()); err != nil {
		t.Errorf("after slots freed: %v", err)
	} else {
		tk.Done()
	}
}
