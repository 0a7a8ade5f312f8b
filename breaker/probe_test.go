package breaker

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"
)

// These tests are issue 13, point 7: a probe is never lost. The open
// state runs on the instants passed in, so most of them use fixed ones;
// hystrix's window reads time.Now, so they stay within its 10 s.

func newProbeBreaker(t *testing.T, s Settings, trans *[]State) *Breaker {
	t.Helper()
	s.Name = fmt.Sprintf("%s-%d", t.Name(), time.Now().UnixNano())
	var cb func(State)
	if trans != nil {
		cb = func(to State) { *trans = append(*trans, to) }
	}
	b, err := New(s, cb)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// hystrixSees waits until hystrix's goroutine has counted the failures
// that make its window unhealthy (IsOpen then opens its circuit), as it
// has in service by the time a sleep window has passed.
func hystrixSees(t *testing.T, b *Breaker) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); !b.cb.IsOpen(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("hystrix never counted the failures")
		}
	}
}

// request is one whole request: its verdict reported at the same instant.
func request(b *Breaker, at time.Time, failed bool) error {
	tk, _, err := b.Allow(at)
	if err != nil {
		return err
	}
	tk.Report(failed, at)
	tk.Done()
	return nil
}

// The failure that crosses the thresholds opens the circuit, and the first
// request a sleep window later probes, even when nothing came in between.
// Before, the sleep window began at that request (when hystrix, asked
// for the first time since its goroutine counted the failures, opened):
// it was refused, and the probe came one sleep window later.
func TestQuietTripProbesAfterOneSleepWindow(t *testing.T) {
	var trans []State
	b := newProbeBreaker(t, Settings{VolumeThreshold: 5, SleepWindow: 2 * time.Second}, &trans)
	base := time.Now()
	for i := 0; i < 5; i++ {
		if err := request(b, base, true); err != nil {
			t.Fatalf("failure %d refused: %v", i+1, err)
		}
	}
	if st := b.State(base); st != Open || fmt.Sprint(trans) != fmt.Sprint([]State{Open}) {
		t.Fatalf("after the 5th failure: state %v, transitions %v; want open, [open]", st, trans)
	}
	if _, _, err := b.Allow(base.Add(2*time.Second - time.Millisecond)); !errors.Is(err, ErrOpen) {
		t.Fatalf("within the sleep window: %v, want ErrOpen", err)
	}
	if st := b.State(base.Add(2 * time.Second)); st != HalfOpen {
		t.Errorf("state after the sleep window: %v, want half-open", st)
	}
	probe, _, err := b.Allow(base.Add(2 * time.Second))
	if err != nil || !probe.probe {
		t.Fatalf("the first request after the sleep window: %v (probe %v), want the probe", err, probe.probe)
	}
	probe.Report(false, base.Add(2*time.Second))
	probe.Done()
	if st := b.State(base.Add(2 * time.Second)); st != Closed {
		t.Errorf("after the probe's success: %v", st)
	}
}

// The bug report's sequence (volume 5, 50 %): trip, a probe closes, 5
// successes, 5 failures. hystrix counts the probe's success in the window
// it empties on closing (6 to 5: healthy); the synchronous window left it
// out (5 to 5: open), so it refused every request and, hystrix being
// closed, no probe ever came, until the failures aged out 10 s later.
// Both windows now agree; the sixth failure opens the circuit and the
// first request a sleep window later probes.
func TestWindowsAgreeAfterTheProbe(t *testing.T) {
	b := newProbeBreaker(t, Settings{VolumeThreshold: 5, SleepWindow: 2 * time.Second}, nil)
	at := time.Now()
	for i := 0; i < 5; i++ {
		_ = request(b, at, true)
	}
	hystrixSees(t, b)
	at = at.Add(2 * time.Second)
	if err := request(b, at, false); err != nil {
		t.Fatalf("probe: %v", err)
	}
	for i := 0; i < 5; i++ {
		if err := request(b, at, false); err != nil {
			t.Fatalf("success %d after the close: %v", i+1, err)
		}
	}
	at = at.Add(2200 * time.Millisecond)
	for i := 0; i < 5; i++ {
		if err := request(b, at, true); err != nil {
			t.Fatalf("failure %d: %v", i+1, err)
		}
	}
	time.Sleep(20 * time.Millisecond) // hystrix counts on its own goroutine: let it catch up, it must agree
	if st := b.State(at); st != Closed {
		t.Fatalf("6 successes and 5 failures (45 %%): state %v, want closed", st)
	}
	if err := request(b, at.Add(100*time.Millisecond), false); err != nil {
		t.Fatalf("6 successes and 5 failures (45 %%): %v", err)
	}
	if err := request(b, at.Add(100*time.Millisecond), true); err != nil {
		t.Fatal(err)
	}
	if err := request(b, at.Add(200*time.Millisecond), true); err != nil {
		t.Fatal(err)
	}
	if st := b.State(at.Add(200 * time.Millisecond)); st != Open { // 7 to 7
		t.Fatalf("7 successes and 7 failures: state %v, want open", st)
	}
	tk, _, err := b.Allow(at.Add(2200 * time.Millisecond))
	if err != nil || !tk.probe {
		t.Fatalf("the first request after the sleep window: %v (probe %v), want the probe", err, tk.probe)
	}
	tk.Report(false, at.Add(2200*time.Millisecond))
	tk.Done()
}

// Of many requests at the end of the sleep window exactly one probes; the
// others are refused until its verdict.
func TestOneProbeAmongConcurrentRequests(t *testing.T) {
	b := newProbeBreaker(t, Settings{ConsecutiveFailures: 1, SleepWindow: time.Minute}, nil)
	at := time.Now()
	_ = request(b, at, true)
	later := at.Add(time.Minute)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var probes []Ticket
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tk, _, err := b.Allow(later)
			if err == nil {
				mu.Lock()
				probes = append(probes, tk)
				mu.Unlock()
			} else if !errors.Is(err, ErrOpen) {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if len(probes) != 1 {
		t.Fatalf("%d requests went through at the end of the sleep window, want 1", len(probes))
	}
	probes[0].Report(false, later)
	probes[0].Done()
	if err := request(b, later, false); err != nil {
		t.Errorf("after the probe's success: %v", err)
	}
}

// A probe whose verdict never comes (Done without Report: the request
// ended on the client's side) is replaced by the next request; one whose
// verdict is late is replaced a sleep window after it went out, and its
// verdict no longer counts.
func TestProbeWithoutVerdictIsReplaced(t *testing.T) {
	b := newProbeBreaker(t, Settings{ConsecutiveFailures: 1, SleepWindow: time.Minute}, nil)
	at := time.Now()
	_ = request(b, at, true)
	at = at.Add(time.Minute)
	lost, _, err := b.Allow(at)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Allow(at); !errors.Is(err, ErrOpen) {
		t.Fatalf("while the probe is out: %v", err)
	}
	lost.Done()
	slow, _, err := b.Allow(at.Add(time.Second))
	if err != nil || !slow.probe {
		t.Fatalf("after a probe without a verdict: %v (probe %v), want the next probe", err, slow.probe)
	}
	if _, _, err := b.Allow(at.Add(time.Minute)); !errors.Is(err, ErrOpen) {
		t.Fatalf("a sleep window after the slow probe went out, up to the instant: %v", err)
	}
	next, _, err := b.Allow(at.Add(time.Minute + time.Second))
	if err != nil || !next.probe {
		t.Fatalf("a sleep window after the slow probe: %v, want a new probe", err)
	}
	slow.Report(false, at.Add(time.Minute+time.Second)) // too late: replaced
	slow.Done()
	if st := b.State(at.Add(time.Minute + time.Second)); st != Open {
		t.Fatalf("the replaced probe's success changed the state to %v", st)
	}
	next.Report(true, at.Add(time.Minute+2*time.Second)) // a full sleep window from this failure
	next.Done()
	if _, _, err := b.Allow(at.Add(2*time.Minute + time.Second)); !errors.Is(err, ErrOpen) {
		t.Fatalf("within the sleep window after the failed probe: %v", err)
	}
	if err := request(b, at.Add(2*time.Minute+2*time.Second), false); err != nil {
		t.Fatalf("a sleep window after the failed probe: %v", err)
	}
}

// Requests in flight across the trip and the close (a hung upstream's,
// timing out late) report nothing: their failures would open the circuit
// again on a recovered upstream.
func TestInFlightFailuresAfterTheCloseAreStale(t *testing.T) {
	b := newProbeBreaker(t, Settings{VolumeThreshold: 5, SleepWindow: time.Second}, nil)
	at := time.Now()
	var hung []Ticket
	for i := 0; i < 10; i++ {
		tk, _, err := b.Allow(at)
		if err != nil {
			t.Fatal(err)
		}
		hung = append(hung, tk)
	}
	for _, tk := range hung[:5] { // the first 5 time out: open
		tk.Report(true, at.Add(300*time.Millisecond))
		tk.Done()
	}
	hystrixSees(t, b)
	at = at.Add(1300 * time.Millisecond)
	if err := request(b, at, false); err != nil {
		t.Fatalf("probe: %v", err)
	}
	for _, tk := range hung[5:] { // the others time out after the close
		tk.Report(true, at)
		tk.Done()
	}
	time.Sleep(20 * time.Millisecond) // hystrix's goroutine
	if err := request(b, at, false); err != nil {
		t.Fatalf("late failures of requests sent before the trip re-opened the circuit: %v", err)
	}
}

// fakeUpstream is the controllable upstream of the property test: it
// fails while failing is set, and counts the calls that reach it.
type fakeUpstream struct {
	failing bool
	calls   int
}

func (u *fakeUpstream) call() (failed bool) {
	u.calls++
	return u.failing
}

// modelWindow is what hystrix's and the synchronous window hold: the
// property test runs well within their 10 s, so nothing ages out.
type modelWindow struct{ total, failed int }

func (w *modelWindow) add(failed bool) {
	w.total++
	if failed {
		w.failed++
	}
}

func (w modelWindow) oursOpen(volume, percent int) bool {
	return w.total >= volume && w.failed*100 >= percent*w.total
}

// hystrixOpen is hystrix's IsOpen on this window: the percentage rounded.
func (w modelWindow) hystrixOpen(volume, percent int) bool {
	return w.total >= volume && int(float64(w.failed)/float64(w.total)*100+0.5) >= percent
}

// probeModel is the circuit the property test expects.
type probeModel struct {
	open   bool
	since  time.Time // open: when the sleep window began
	period int       // bumped on every change of period, as the breaker's
	sw     modelWindow
	inARow int
	// hystrix: its circuit is open (hOpen); its window (hw) was unhealthy
	// since it was last emptied (hMay: IsOpen may say so at any time, as
	// its goroutine lags). If its goroutine had not counted the failures
	// when the probe succeeded, it was not emptied: then it holds gw.
	hOpen, hMay  bool
	hw           modelWindow
	ghost, gMay  bool
	gw           modelWindow
	volume       int
	percent      int
	limit        int
	sleep        time.Duration
	lagExplained int // trips only a missed emptying explains
}

func (m *probeModel) addToWindows(failed bool) {
	m.sw.add(failed)
	m.hw.add(failed)
	m.hMay = m.hMay || m.hw.hystrixOpen(m.volume, m.percent)
	if m.ghost {
		m.gw.add(failed)
		m.gMay = m.gMay || m.gw.hystrixOpen(m.volume, m.percent)
	}
}

// probeSucceeded: both windows start again. hystrix's is emptied if its
// circuit is open, which it is when it opened the circuit, or now (IsOpen)
// if its window is unhealthy and its goroutine has counted it.
func (m *probeModel) probeSucceeded() {
	switch {
	case m.hOpen:
		m.hw, m.ghost = modelWindow{}, false
	case m.hw.hystrixOpen(m.volume, m.percent):
		m.ghost, m.gw = true, m.hw
		m.hw = modelWindow{}
	}
	m.hOpen = false
	m.hw.add(false)
	m.hMay = m.hw.hystrixOpen(m.volume, m.percent)
	if m.ghost {
		m.gw.add(false)
		m.gMay = m.gw.hystrixOpen(m.volume, m.percent)
	}
	m.sw = modelWindow{}
	m.sw.add(false)
	m.open, m.inARow = false, 0
	m.period++
}

// hystrixOpened: a request was refused on a closed circuit, which only
// hystrix's IsOpen does here (the synchronous window opens the circuit at
// the verdict that crosses the thresholds).
func (m *probeModel) hystrixOpened(now time.Time) error {
	switch {
	case m.hMay:
	case m.ghost && m.gMay:
		m.lagExplained++
		m.hw, m.hMay = m.gw, m.gMay
	default:
		return fmt.Errorf("closed: refused with both windows healthy (%+v, %+v)", m.hw, m.sw)
	}
	m.ghost = false
	m.open, m.since, m.hOpen = true, now, true
	m.period++
	return nil
}

type flight struct {
	tk     Ticket
	failed bool
	period int
	probe  bool
	start  time.Time
}

// TestProbeProperty drives random sequences (seeded) of requests that
// succeed, fail or stay in flight, verdicts that come late or never,
// upstream failures and recoveries, and waits, against a Breaker with
// short sleep windows, and checks each step against the model: while open
// no request reaches the upstream until the sleep window has passed;
// after it the first request is the probe and exactly one is out; its
// success closes, its failure opens for a full sleep window from the
// verdict; the failure that crosses the thresholds opens at once; a
// verdict from an earlier period counts for nothing.
func TestProbeProperty(t *testing.T) {
	seeds := 8
	if testing.Short() {
		seeds = 2
	}
	start := time.Now()
	for seed := 1; seed <= seeds; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) { runProbeProperty(t, uint64(seed)) })
	}
	t.Logf("%d seeds in %v", seeds, time.Since(start).Round(time.Millisecond))
}

func runProbeProperty(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	m := &probeModel{
		volume:  2 + rng.IntN(7),
		percent: []int{20, 40, 50, 60, 80}[rng.IntN(5)], // not 100: the windows do not age within a run
		sleep:   time.Duration(40+rng.IntN(41)) * time.Millisecond,
	}
	if rng.IntN(2) == 0 {
		m.limit = 2 + rng.IntN(3)
	}
	var trans []State
	b := newProbeBreaker(t, Settings{VolumeThreshold: m.volume, ErrorPercent: m.percent, SleepWindow: m.sleep,
		ConsecutiveFailures: m.limit}, &trans)
	t.Logf("volume %d, %d %%, sleep %v, consecutive %d", m.volume, m.percent, m.sleep, m.limit)
	up := &fakeUpstream{}
	var held []flight
	var log []string // the steps so far, shown on failure
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("step %d: %s\nthe last steps:\n%s", len(log), fmt.Sprintf(format, args...), strings.Join(log[max(0, len(log)-40):], ""))
	}
	var stats struct{ probes, replaced, probeFailures, stale, noVerdict, refused int }
	probeOut := false
	seen := 0
	newTrans := func() []State {
		got := trans[seen:]
		seen = len(trans)
		return got
	}
	expectTrans := func(what string, want ...State) {
		t.Helper()
		if got := newTrans(); fmt.Sprint(got) != fmt.Sprint(want) {
			fail("%s: transitions %v, want %v", what, got, want)
		}
	}

	finish := func(f flight, report bool) {
		t.Helper()
		now := time.Now()
		if !report {
			log = append(log, fmt.Sprintf("done without verdict(probe %v)\n", f.probe))
			f.tk.Done()
			if f.probe && f.period == m.period {
				stats.noVerdict++
				probeOut = false
				m.since = m.since.Add(-m.sleep) // the next request probes
				m.period++
			}
			expectTrans("a request done without a verdict")
			return
		}
		log = append(log, fmt.Sprintf("+%v report(failed %v, probe %v, stale %v)\n", now.Sub(f.start).Round(time.Millisecond), f.failed, f.probe, f.period != m.period))
		f.tk.Report(f.failed, now)
		f.tk.Done()
		if f.probe && f.period == m.period {
			probeOut = false
		}
		switch {
		case f.period != m.period:
			stats.stale++
			expectTrans("a stale verdict")
		case f.probe && f.failed:
			stats.probeFailures++
			m.addToWindows(true)
			m.since = now
			m.period++
			expectTrans("a failed probe")
		case f.probe:
			m.probeSucceeded()
			expectTrans("the probe's success", Closed)
		default:
			m.addToWindows(f.failed)
			if f.failed {
				m.inARow++
			} else {
				m.inARow = 0
			}
			if (f.failed && m.limit > 0 && m.inARow >= m.limit) || m.sw.oursOpen(m.volume, m.percent) {
				m.open, m.since = true, now
				m.period++
				expectTrans("the verdict that crossed the thresholds", Open)
			} else {
				expectTrans("a verdict below the thresholds")
			}
		}
	}

	send := func() {
		t.Helper()
		now := time.Now()
		calls := up.calls
		tk, _, err := b.Allow(now)
		admitted := err == nil
		if err != nil && !errors.Is(err, ErrOpen) {
			fail("Allow: %v", err)
		}
		var f flight
		if admitted {
			f = flight{tk: tk, failed: up.call(), period: m.period, probe: tk.probe, start: now}
		}
		if m.open {
			elapsed := now.Sub(m.since)
			log = append(log, fmt.Sprintf("send while open +%v: admitted %v\n", elapsed.Round(time.Millisecond), admitted))
			switch {
			case admitted && elapsed < m.sleep:
				fail("open: the upstream got a call %v into the sleep window of %v", elapsed, m.sleep)
			case !admitted && elapsed >= m.sleep:
				fail("open: the first request %v after the sleep window began (%v) was refused: the probe is lost", elapsed, m.sleep)
			case admitted && !tk.probe:
				fail("open: admitted a request that is not the probe")
			case admitted:
				stats.probes++
				if probeOut {
					stats.replaced++ // out for a sleep window without a verdict
				}
				probeOut = true
				m.since = now // the probe is out; another is let through only a sleep window later
				m.period++
				f.period = m.period
			}
			expectTrans("a request while open")
		} else {
			log = append(log, fmt.Sprintf("send while closed: admitted %v\n", admitted))
			switch {
			case admitted && tk.probe:
				fail("closed: a probe")
			case !admitted:
				if err := m.hystrixOpened(now); err != nil {
					fail("%v", err)
				}
				expectTrans("hystrix's opening", Open)
			default:
				expectTrans("a request while closed")
			}
		}
		if !admitted {
			stats.refused++
			if up.calls != calls {
				fail("a refused request reached the upstream")
			}
			return
		}
		if len(held) < 8 && rng.IntN(4) == 0 {
			held = append(held, f) // in flight: its verdict comes later, or never
			return
		}
		finish(f, true)
	}

	deadline := time.Now().Add(700 * time.Millisecond)
	for step := 0; step < 400 && time.Now().Before(deadline); step++ {
		switch r := rng.IntN(100); {
		case r < 55:
			send()
		case r < 67 && len(held) > 0:
			i := rng.IntN(len(held))
			f := held[i]
			held = append(held[:i], held[i+1:]...)
			finish(f, rng.IntN(4) != 0)
		case r < 73:
			// Failing spells last longer than healthy ones: the windows
			// do not age within a run, so successes would pile up.
			if !up.failing || rng.IntN(3) == 0 {
				up.failing = !up.failing
				log = append(log, fmt.Sprintf("upstream failing %v\n", up.failing))
			}
		case r < 90 || !m.open:
			d := time.Duration(rng.IntN(10)) * time.Millisecond
			log = append(log, fmt.Sprintf("wait %v\n", d))
			time.Sleep(d)
		default: // around the end of the sleep window
			d := m.sleep/2 + time.Duration(rng.Int64N(int64(m.sleep)))
			log = append(log, fmt.Sprintf("wait %v\n", d))
			time.Sleep(d)
		}
		now := time.Now()
		want := Closed
		switch {
		case m.open && now.Sub(m.since) >= m.sleep:
			want = HalfOpen
		case m.open:
			want = Open
		}
		if st := b.State(now); st != want {
			fail("state %v, want %v (open %v, %v since the sleep window began; wall clock %v)", st, want, m.open, now.Sub(m.since),
				time.Duration(now.UnixNano()-m.since.UnixNano()))
		}
	}
	for _, f := range held {
		f.tk.Done()
	}
	var opens, closes int
	for _, s := range trans {
		if s == Open {
			opens++
		} else {
			closes++
		}
	}
	t.Logf("%d steps: %d upstream calls, %d refused; opened %d times, closed %d; %d probes (%d replacing one out for a sleep window), %d failed, %d without a verdict; %d stale verdicts",
		len(log), up.calls, stats.refused, opens, closes, stats.probes, stats.replaced, stats.probeFailures, stats.noVerdict, stats.stale)
	if m.lagExplained > 0 {
		t.Logf("%d trips by hystrix on failures from before a close: its goroutine lagged a sleep window behind", m.lagExplained)
	}
}
