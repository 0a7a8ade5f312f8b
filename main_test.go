package main

import (
	"io"
	"strings"
	"testing"
)

// -watch-interval is 0 (off) or long enough not to keep a core busy
// re-reading the files: 1ns ran at a full core while idle.
func TestWatchIntervalBounds(t *testing.T) {
	for _, tc := range []struct {
		value string
		ok    bool
	}{{"0", true}, {"100ms", true}, {"2s", true}, {"1ns", false}, {"99ms", false}, {"-1s", false}} {
		_, err := parseFlags([]string{"-watch-interval", tc.value}, io.Discard)
		if (err == nil) != tc.ok {
			t.Errorf("-watch-interval %s: %v, want ok=%v", tc.value, err, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "-watch-interval") {
			t.Errorf("-watch-interval %s: the error does not name the flag: %v", tc.value, err)
		}
	}
}
