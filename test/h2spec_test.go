package test

import (
	"context"
	"encoding/xml"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// h2spec (github.com/summerwind/h2spec) is the HTTP/2 conformance suite:
// 145 cases against RFC 7540/7541. make deps-test installs it into
// $(go env GOPATH)/bin.
const h2specInstall = "GOBIN=$(go env GOPATH)/bin go install github.com/summerwind/h2spec/cmd/h2spec@v2.2.1+incompatible (make deps-test does)"

// h2specKnown are the cases the sidecar fails, by id (the JUnit package
// and the case's 1-based place in it, as h2spec's own text names them:
// "http2/6.5.3/1"). Every other case must pass, and each of these must
// still fail, so that the list stays exact.
var h2specKnown = map[string]string{
	// h2c only: the port is shared with HTTP/1.1, so bytes that are not
	// the HTTP/2 preface are an HTTP/1.1 request (frontend/listen) and get
	// an HTTP/1.1 400, not a closed connection. Over TLS, ALPN decides and
	// the case passes.
	"http2/3.5/2": "h2c",
	// Go's HTTP/2 server treats a SETTINGS frame that repeats a parameter
	// as a connection error (PROTOCOL_ERROR), where RFC 9113 §6.5.3 says to
	// process the values in order.
	"http2/6.5.3/1": "",
	// A request with a connection-specific field (Connection; TE other
	// than "trailers") is malformed (RFC 9113 §8.2.2) and wants a stream
	// error; Go's HTTP/2 server answers it 400 itself instead, before the
	// handler sees it.
	"http2/8.1.2.2/1": "",
	"http2/8.1.2.2/2": "",
}

// h2specBin finds h2spec in PATH, or where make deps-test puts it.
func h2specBin(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("h2spec"); err == nil {
		return p
	}
	var tried []string
	for _, v := range []string{"GOBIN", "GOPATH"} {
		out, err := exec.Command("go", "env", v).Output()
		if err != nil {
			continue
		}
		for _, dir := range filepath.SplitList(strings.TrimSpace(string(out))) {
			if v == "GOPATH" {
				dir = filepath.Join(dir, "bin")
			}
			p := filepath.Join(dir, "h2spec")
			if st, err := os.Stat(p); err == nil && !st.IsDir() {
				return p
			}
			tried = append(tried, p)
		}
	}
	t.Fatalf("h2spec is not in PATH nor at %v: install it with %s", tried, h2specInstall)
	return ""
}

// h2specReport is the part of h2spec's JUnit report (-j) read here.
type h2specReport struct {
	Suites []struct {
		Package string `xml:"package,attr"`
		Name    string `xml:"name,attr"`
		Cases   []struct {
			Name    string    `xml:"classname,attr"`
			Failure *struct{} `xml:"failure"`
			Error   *struct {
				Text string `xml:",chardata"`
			} `xml:"error"`
			Skipped *struct{} `xml:"skipped"`
		} `xml:"testcase"`
	} `xml:"testsuite"`
}

// runH2spec runs h2spec against the sidecar at addr and checks the result
// against h2specKnown for the transport ("h2c" or "tls").
func runH2spec(t *testing.T, addr, transport string) {
	bin := h2specBin(t)
	_, port, _ := strings.Cut(addr, ":")
	report := filepath.Join(t.TempDir(), "h2spec.xml")
	args := []string{"-h", "127.0.0.1", "-p", port, "-o", "2", "-j", report}
	if transport == "tls" {
		args = append(args, "-t", "-k")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()
	start := time.Now()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("h2spec did not finish in 25 s:\n%s", out)
	}
	// h2spec exits 1 when a case fails: the report says which.
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatal(err)
	}
	data, rerr := os.ReadFile(report)
	if rerr != nil {
		t.Fatalf("no JUnit report (%v): %v\n%s", err, rerr, out)
	}
	var r h2specReport
	if err := xml.Unmarshal(data, &r); err != nil {
		t.Fatal(err)
	}
	var failed []string
	total, passed := 0, 0
	for _, s := range r.Suites {
		for i, c := range s.Cases {
			total++
			id := s.Package + "/" + strconv.Itoa(i+1)
			known, isKnown := h2specKnown[id]
			expectFail := isKnown && (known == "" || known == transport)
			switch {
			case c.Skipped != nil:
				t.Errorf("%s skipped (%s: %s): the backend's body is long enough, nothing should be", id, s.Name, c.Name)
			case c.Failure != nil || c.Error != nil:
				failed = append(failed, id)
				if !expectFail {
					msg := ""
					if c.Error != nil {
						msg = strings.TrimSpace(c.Error.Text)
					}
					t.Errorf("%s failed: %s: %s (got %s)", id, s.Name, c.Name, msg)
				}
			default:
				passed++
				if expectFail {
					t.Errorf("%s (%s: %s) passes now: drop it from h2specKnown", id, s.Name, c.Name)
				}
			}
		}
	}
	sort.Strings(failed)
	t.Logf("h2spec over %s: %d cases, %d passed, failed %v, in %v", transport, total, passed, failed, time.Since(start).Round(time.Millisecond))
	if total < 145 {
		t.Errorf("the report has %d cases, h2spec 2.x has 145: is it h2spec's format?\n%s", total, out)
	}
	if t.Failed() {
		t.Logf("h2spec output:\n%s", out)
	}
}

// h2specBackend answers every request with a body of more than 5 bytes
// (h2spec skips the flow-control case 6.9.2/2 on shorter ones).
func h2specBackend(t *testing.T) *backend {
	return startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the backend behind the sidecar: %s %s\n", r.Method, r.URL.Path)
	})
}

func TestH2specH2C(t *testing.T) {
	be := h2specBackend(t)
	sc := startSidecar(t, "[server]\nh2c = true\n"+routeTo(be.url(), ""))
	runH2spec(t, sc.Addr, "h2c")
	if v := sc.metric(`sidecar_requests_by_protocol_total{protocol="h2"}`); v < 50 {
		t.Errorf("%v HTTP/2 requests reached the proxy path during h2spec", v)
	}
}

func TestH2specTLS(t *testing.T) {
	pk := newPKI(t)
	pk.issue("server", "localhost", 10, false)
	be := h2specBackend(t)
	sc := startSidecar(t, fmt.Sprintf("[server.tls]\ncert_file = %q\nkey_file = %q\n",
		filepath.Join(pk.dir, "server.pem"), filepath.Join(pk.dir, "server.key"))+routeTo(be.url(), ""))
	runH2spec(t, sc.Addr, "tls")
}
