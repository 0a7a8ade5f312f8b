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

// After a healthy spell, a run of ConsecutiveFailures failures opens the
// circuit at once, though the window's error percentage is far below its
// threshold; after the sleep window one probe decides, like hystrix's.
func TestConsecutiveFailuresTrip(t *testing.T) {
	var transitions []State
	b, err := New(Settings{Name: fmt.Sprintf("test-consecutive-%d", time.Now().UnixNano()), VolumeThreshold: 20, ErrorPercent: 50,
		SleepWindow: time.Minute, ConsecutiveFailures: 3}, func(to State) { transitions = append(transitions, to) })
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	request := func(at time.Time, failed bool) error {
		tk, _, err := b.Allow(at)
		if err != nil {
			return err
		}
		tk.Report(failed, at)
		tk.Done()
		return nil
	}
	for i := 0; i < 50; i++ { // the healthy spell: 50 successes in the window
		if err := request(now, false); err != nil {
			t.Fatal(err)
		}
	}
	// Two failures, a success, two failures: never three in a row.
	for _, failed := range []bool{true, true, false, true, true} {
		if err := request(now, failed); err != nil {
			t.Fatalf("refused before three failures in a row: %v", err)
		}
	}
	if err := request(now, true); err != nil { // the third in a row
		t.Fatal(err)
	}
	_, retry, err := b.Allow(now)
	if !errors.Is(err, ErrOpen) {
		t.Fatalf("after 3 failures in a row (5 of 56 in the window): %v, want ErrOpen", err)
	}
	if retry < 59*time.Second || b.State(now) != Open {
		t.Errorf("retry in %v, state %v; want ~1m, open", retry, b.State(now))
	}
	// The sleep window is over: one probe, the others still refused. It
	// fails: another sleep window.
	later := now.Add(time.Minute)
	if b.State(later) != HalfOpen {
		t.Errorf("state after the sleep window: %v", b.State(later))
	}
	probe, _, err := b.Allow(later)
	if err != nil {
		t.Fatalf("no probe after the sleep window: %v", err)
	}
	if _, _, err := b.Allow(later); !errors.Is(err, ErrOpen) {
		t.Fatalf("a second request during the probe: %v, want ErrOpen", err)
	}
	probe.Report(true, later)
	probe.Done()
	if _, _, err := b.Allow(later.Add(time.Second)); !errors.Is(err, ErrOpen) {
		t.Fatalf("after a failed probe: %v, want ErrOpen", err)
	}
	// The next probe succeeds: closed, and requests flow.
	later = later.Add(time.Minute)
	if err := request(later, false); err != nil {
		t.Fatalf("second probe: %v", err)
	}
	if err := request(later, false); err != nil || b.State(later) != Closed {
		t.Fatalf("after a successful probe: %v, state %v", err, b.State(later))
	}
	if fmt.Sprint(transitions) != fmt.Sprint([]State{Open, Closed}) {
		t.Errorf("transitions %v, want [open closed]", transitions)
	}
}

// Without ConsecutiveFailures a run of failures after a healthy spell
// leaves the circuit to hystrix's percentage: still closed here.
func TestConsecutiveFailuresOffByDefault(t *testing.T) {
	b, err := New(Settings{Name: fmt.Sprintf("test-consecutive-off-%d", time.Now().UnixNano()), SleepWindow: time.Minute}, nil)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for i := 0; i < 60; i++ {
		tk, _, err := b.Allow(now)
		if err != nil {
			t.Fatalf("request %d refused: %v", i, err)
		}
		tk.Report(i >= 50, now) // 10 failures in a row after 50 successes: 17 %
		tk.Done()
	}
	if s := b.State(now); s != Closed {
		t.Errorf("state %v, want closed", s)
	}
}

// A reload replaces the Breaker; the new one keeps the trip (hystrix keeps
// its own state by name, the trip is this package's).
func TestInheritKeepsTheTrip(t *testing.T) {
	name := fmt.Sprintf("test-inherit-%d", time.Now().UnixNano())
	old, _ := New(Settings{Name: name, SleepWindow: time.Minute, ConsecutiveFailures: 2}, nil)
	now := time.Now()
	for i := 0; i < 2; i++ {
		tk, _, err := old.Allow(now)
		if err != nil {
			t.Fatal(err)
		}
		tk.Report(true, now)
		tk.Done()
	}
	var transitions []State
	b, _ := New(Settings{Name: name, SleepWindow: time.Minute, ConsecutiveFailures: 2, MaxConcurrent: 5}, func(to State) { transitions = append(transitions, to) })
	b.Inherit(old)
	if _, _, err := b.Allow(now.Add(time.Second)); !errors.Is(err, ErrOpen) {
		t.Fatalf("after the reload: %v, want ErrOpen", err)
	}
	if len(transitions) != 0 {
		t.Errorf("the reload reported transitions %v: the circuit was open already", transitions)
	}
}
