// Package httpsyntax holds the character classes of HTTP's grammar that
// both the front-end (proxy) and the upstream client check bytes against.
package httpsyntax

// Token marks RFC 9110 token characters (field names, methods).
var Token = AlnumAnd("!#$%&'*+-.^_`|~")

// IsToken reports whether b is a non-empty token.
func IsToken(b []byte) bool {
	for _, c := range b {
		if !Token[c] {
			return false
		}
	}
	return len(b) > 0
}

// AlnumAnd is the table of ASCII letters and digits and the bytes of extra.
func AlnumAnd(extra string) (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range extra {
		t[c] = true
	}
	return t
}
