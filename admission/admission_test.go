package admission

import "testing"

// Limiter keys write each part with its length: no client id, whatever it
// holds, spells another (tier, client, route).
func TestLimitKeysAreUnambiguous(t *testing.T) {
	key := func(tier, client, route string) string {
		b := AppendKey(nil, tier, []byte(client))
		if route != "" {
			b = appendKeyPart(b, route)
		}
		return string(b)
	}
	if got := key("anonymous", "ip:127.0.0.1", ""); got != "9:anonymous12:ip:127.0.0.1" {
		t.Errorf("key %q", got)
	}
	seen := map[string][3]string{}
	for _, c := range [][3]string{
		{"t", "jwt:x", "r"}, {"t", "jwt:x|r", ""}, {"t", "jwt:x|", "r"}, {"t|jwt:x", "r", ""},
		{"t", "jwt:x5:r", ""}, {"t", "jwt:x", "5:r"}, {"t", "", "jwt:x"}, {"t1", ":jwt:x", ""},
	} {
		k := key(c[0], c[1], c[2])
		if prev, dup := seen[k]; dup {
			t.Errorf("%q and %q share the key %q", prev, c, k)
		}
		seen[k] = c
	}
}
