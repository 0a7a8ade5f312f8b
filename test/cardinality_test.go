package test

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// seriesCount counts the sample lines on /metrics.
func seriesCount(t *testing.T, sc *sidecar) int {
	t.Helper()
	resp, err := http.Get("http://" + sc.Admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	n := 0
	s := bufio.NewScanner(resp.Body)
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		if line := s.Text(); line != "" && !strings.HasPrefix(line, "#") {
			n++
		}
	}
	return n
}

// 100,000 distinct clients, paths, API keys and made-up methods must not
// grow the number of series on /metrics.
func TestMetricsCardinalityIsBounded(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	dir := t.TempDir()
	writeKeys(t, dir)
	sc := startSidecarIn(t, dir, `
[server]
trusted_proxies = ["127.0.0.0/8"]
[identity]
api_keys_file = "keys.toml"
[tiers.anonymous]
limit = 1000000000
window = "1m"
[tiers.premium]
limit = 1000000000
window = "1m"
`+routeTo(be.url(), ""))
	send := func(from, to int) {
		var wg sync.WaitGroup
		per := (to - from) / 8
		for w := 0; w < 8; w++ {
			wg.Add(1)
			go func(lo, hi int) {
				defer wg.Done()
				c, err := net.Dial("tcp", sc.Addr)
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				br := bufio.NewReader(c)
				for i := lo; i < hi; i++ {
					method := []string{"GET", "POST", fmt.Sprintf("M%dX", i)}[i%3]
					key := ""
					if i%5 == 0 {
						key = fmt.Sprintf("X-API-Key: made-up-%d\r\n", i) // unknown keys: 401s
					}
					fmt.Fprintf(c, "%s /path/%d?q=%d HTTP/1.1\r\nHost: h%d.example\r\nX-Forwarded-For: 10.%d.%d.%d\r\n%sContent-Length: 0\r\n\r\n",
						method, i, i, i%1000, i>>16&255, i>>8&255, i&255, key)
					c.SetReadDeadline(time.Now().Add(10 * time.Second))
					resp, err := http.ReadResponse(br, nil)
					if err != nil {
						t.Errorf("request %d: %v", i, err)
						return
					}
					resp.Body.Close()
				}
			}(from+w*per, from+(w+1)*per)
		}
		wg.Wait()
	}
	send(0, 2000) // warm-up: every kind of series exists
	before := seriesCount(t, sc)
	start := time.Now()
	send(2000, 102000)
	after := seriesCount(t, sc)
	t.Logf("100,000 requests from distinct clients, paths, keys and methods in %v: %d series before, %d after",
		time.Since(start).Round(time.Millisecond), before, after)
	if after > before+5 { // a few runtime histograms may gain a bucket
		t.Errorf("series grew from %d to %d with the traffic", before, after)
	}
}
