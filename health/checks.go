package health

import (
	"crypto/tls"
	"net/http"
	"sync"
	"time"
)

// Check is one endpoint's active health check.
type Check struct {
	Addr               string // host:port
	Path               string
	Interval           time.Duration
	Timeout            time.Duration
	ExpectedStatus     int
	HealthyThreshold   int         // consecutive passes to become healthy
	UnhealthyThreshold int         // consecutive failures to become unhealthy
	TLS                *tls.Config // https endpoint; nil: http
}

// Checker runs active health checks until Stop. Endpoints start healthy:
// a restart must not blackhole traffic until the first checks pass.
type Checker struct {
	stop chan struct{}
	once sync.Once
	wg   sync.WaitGroup
}

// StartChecks probes every check on its own ticker. changed(i, healthy) is
// called when check i's endpoint changes state; result(i, pass) after each
// probe (for metrics). Both may be called from several goroutines.
func StartChecks(checks []Check, changed func(i int, healthy bool), result func(i int, pass bool)) *Checker {
	c := &Checker{stop: make(chan struct{})}
	for i, chk := range checks {
		c.wg.Add(1)
		go c.run(i, chk, changed, result)
	}
	return c
}

// Stop ends the checks and waits for them.
func (c *Checker) Stop() {
	c.once.Do(func() { close(c.stop) })
	c.wg.Wait()
}

func (c *Checker) run(i int, chk Check, changed func(int, bool), result func(int, bool)) {
	defer c.wg.Done()
	client := &http.Client{Timeout: chk.Timeout, Transport: &http.Transport{DisableKeepAlives: true, TLSClientConfig: chk.TLS}}
	healthy, passes, fails := true, 0, 0
	t := time.NewTicker(chk.Interval)
	defer t.Stop()
	for {
		pass := probe(client, chk)
		result(i, pass)
		if pass {
			passes, fails = passes+1, 0
			if !healthy && passes >= chk.HealthyThreshold {
				healthy = true
				changed(i, true)
			}
		} else {
			fails, passes = fails+1, 0
			if healthy && fails >= chk.UnhealthyThreshold {
				healthy = false
				changed(i, false)
			}
		}
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
	}
}

func probe(client *http.Client, chk Check) bool {
	scheme := "http://"
	if chk.TLS != nil {
		scheme = "https://"
	}
	resp, err := client.Get(scheme + chk.Addr + chk.Path)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == chk.ExpectedStatus
}
