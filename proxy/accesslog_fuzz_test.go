package proxy

import (
	"bytes"
	"encoding/json"
	"slices"
	"strconv"
	"testing"
	"time"
	"unicode/utf8"
)

// FuzzAccessLogLine writes made-up entries with the access log's
// hand-written JSON encoder and checks each line against encoding/json:
//
//   - one line, ending in its only '\n', that json.Valid accepts and
//     that is valid UTF-8;
//   - exactly the expected keys, in order, each once (a value cannot
//     close its string and add a field);
//   - every string field decodes to the value written, with each byte of
//     invalid UTF-8 as U+FFFD (what encoding/json writes for it), the
//     client as its fingerprint, and the numbers as written.
func FuzzAccessLogLine(f *testing.F) {
	f.Add("3e12f4283e5c-1", "app", "GET", "anonymous", "ip:10.0.0.1", "allowed", "closed", "", "127.0.0.1:3000", 200, int64(650000), int64(400000), int64(0), int64(13), int64(1767225600123456789))
	f.Add(`"},"status":999,"x":"`, `\`, `\"`, "\\u0000", "", "", "", "", "", 0, int64(0), int64(0), int64(0), int64(0), int64(0))
	f.Add("\x00\x01\x1f\x7f", "\n\r\t\b\f", "\u2028\u2029", "\ufeff", "\xff", "\xc3", "\xed\xa0\x80", "\xf4\x90\x80\x80", "a\xe2\x82", 599, int64(-1), int64(1), int64(-1), int64(1<<62), int64(-1))
	f.Add("é€😀", "\uFFFD", "\xef\xbf\xbd\xef\xbf", "</script>&<>", "key:\x00", "shadow_denied", "half_open", "fallback", "[::1]:80", -1, int64(1<<62), int64(-1<<62), int64(-1<<62), int64(-1<<62), int64(-1<<62))
	const key = "fuzz"
	a := &accessLog{secret: func() []byte { return []byte(key) }}
	now := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	keys := []string{"time", "level", "msg", "at", "request_id", "route", "method", "protocol", "status", "tier", "client",
		"limit", "breaker", "fallback", "upstream", "duration_ms", "upstream_ms", "bytes_in", "bytes_out"}
	f.Fuzz(func(t *testing.T, requestID, route, method, tier, client, limit, brk, fallback, endpoint string,
		status int, duration, upstream, bytesIn, bytesOut, at int64) {
		e := accessEntry{at: time.Unix(0, at).UTC(), requestID: requestID, route: route, method: method, protocol: "h2", status: status,
			tier: tier, client: client, limit: limit, breaker: brk, fallback: fallback, endpoint: endpoint,
			duration: time.Duration(duration), upstream: time.Duration(upstream), bytesIn: bytesIn, bytesOut: bytesOut}
		a.batch.Reset()
		a.write(e, now)
		line := a.batch.Bytes()
		if i := bytes.IndexByte(line, '\n'); i != len(line)-1 {
			t.Fatalf("a line must end in its only newline (at %d of %d): %q", i, len(line), line)
		}
		line = line[:len(line)-1]
		// json.Valid lets invalid UTF-8 through (a decoder replaces it);
		// the line promises none.
		if !json.Valid(line) || !utf8.Valid(line) {
			t.Fatalf("not valid JSON in UTF-8: %q", line)
		}
		if got := objectKeys(t, line); !slices.Equal(got, keys) {
			t.Fatalf("keys %q, want %q in\n%q", got, keys, line)
		}
		var got map[string]any
		d := json.NewDecoder(bytes.NewReader(line))
		d.UseNumber()
		if err := d.Decode(&got); err != nil {
			t.Fatalf("%v: %q", err, line)
		}
		fingerprint := ""
		if client != "" {
			fingerprint = a.fingerprint(client)
		}
		for k, want := range map[string]string{
			"time": now.Format(time.RFC3339Nano), "level": "INFO", "msg": "request", "at": e.at.Format(time.RFC3339Nano),
			"request_id": asDecoded(requestID), "route": asDecoded(route), "method": asDecoded(method),
			"tier": asDecoded(tier), "client": fingerprint, "limit": asDecoded(limit), "breaker": asDecoded(brk),
			"fallback": asDecoded(fallback), "upstream": asDecoded(endpoint), "status": strconv.Itoa(status),
			"bytes_in": strconv.FormatInt(bytesIn, 10), "bytes_out": strconv.FormatInt(bytesOut, 10),
		} {
			if s := stringOf(got[k]); s != want {
				t.Errorf("%s: %q, want %q in\n%q", k, s, want, line)
			}
		}
		for k, d := range map[string]time.Duration{"duration_ms": e.duration, "upstream_ms": e.upstream} {
			n, _ := got[k].(json.Number)
			ms, err := n.Float64()
			if want := float64(d.Microseconds()) / 1000; err != nil || ms != want {
				t.Errorf("%s: %q (%v), want %v in\n%q", k, n, err, want, line)
			}
		}
	})
}

// asDecoded is s as it reads back from a JSON string: each byte of
// invalid UTF-8 becomes U+FFFD, as in []rune(s).
func asDecoded(s string) string { return string([]rune(s)) }

// stringOf is a decoded JSON string or number as text; anything else
// (a missing field, a bool, null) is a text no field expects.
func stringOf(v any) string {
	switch v := v.(type) {
	case string:
		return v
	case json.Number:
		return v.String()
	}
	return "\x00" + "not a string or number"
}

// objectKeys lists the keys of the flat JSON object line, in order and
// with repeats, which decoding into a map would hide.
func objectKeys(t *testing.T, line []byte) []string {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader(line))
	if tok, err := d.Token(); err != nil || tok != json.Delim('{') {
		t.Fatalf("not an object (%v, %v): %q", tok, err, line)
	}
	var keys []string
	for d.More() {
		tok, err := d.Token()
		if err != nil {
			t.Fatalf("%v: %q", err, line)
		}
		keys = append(keys, tok.(string))
		if tok, err = d.Token(); err != nil {
			t.Fatalf("%v: %q", err, line)
		}
		if _, nested := tok.(json.Delim); nested {
			t.Fatalf("%s: a nested value in %q", keys[len(keys)-1], line)
		}
	}
	return keys
}
