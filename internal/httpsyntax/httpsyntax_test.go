package httpsyntax

import "testing"

func TestIsToken(t *testing.T) {
	for s, want := range map[string]bool{"X-Foo": true, "a!#$%&'*+-.^_`|~9": true, "X Foo": false, "": false, "a:b": false, "é": false} {
		if got := IsToken([]byte(s)); got != want {
			t.Errorf("IsToken(%q) = %v, want %v", s, got, want)
		}
	}
}
