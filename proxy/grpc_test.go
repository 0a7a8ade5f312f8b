package proxy

import (
	"testing"
	"time"
)

func TestGRPCTimeout(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"300m", 300 * time.Millisecond, true},
		{"1H", time.Hour, true},
		{"99999999n", 99999999 * time.Nanosecond, true},
		{"2562047H", 2562047 * time.Hour, true}, // the most hours a Duration holds
		// Valid, but past what a Duration holds: no deadline, rather than
		// one that wrapped around into the past.
		{"2562048H", 0, false},
		{"99999999H", 0, false},
		{"99999999M", 99999999 * time.Minute, true}, // ~190 years: fits
		{"", 0, false},
		{"5", 0, false},
		{"5x", 0, false},
		{"-5S", 0, false},
		{"123456789S", 0, false}, // nine digits
	} {
		got, ok := grpcTimeout([]byte(tc.in))
		if got != tc.want || ok != tc.ok {
			t.Errorf("grpcTimeout(%q) = %v, %v; want %v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}
