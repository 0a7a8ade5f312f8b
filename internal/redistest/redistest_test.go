package redistest

import (
	"fmt"
	"strings"
	"testing"
)

// TestDoShapes pins the reply shapes the tests in limiter/ and test/ read
// from Do and DoAs.
func TestDoShapes(t *testing.T) {
	s := Start(t)
	f := func(want string, args ...string) {
		t.Helper()
		v, err := Do(s.Addr, args...)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		if got := fmt.Sprintf("%T %v", v, v); got != want {
			t.Fatalf("%v: got %s, want %s", args, got, want)
		}
	}
	f("string PONG", "PING")
	f("string OK", "SET", "k", "v")
	f("string v", "GET", "k")
	f("<nil> <nil>", "GET", "missing")
	f("int64 -1", "PTTL", "k")
	f("[]interface {} [0]", "SCRIPT", "EXISTS", "0000000000000000000000000000000000000000")
	f("[]interface {} [0 [k]]", "SCAN", "0", "MATCH", "k", "COUNT", "1000")
	if v, err := Do(s.Addr, "INFO", "commandstats"); err != nil || !strings.Contains(v.(string), "cmdstat_ping:calls=") {
		t.Fatalf("INFO commandstats: %v %v", v, err)
	}
	if _, err := Do(s.Addr, "NOSUCHCOMMAND"); err == nil || !strings.HasPrefix(err.Error(), "ERR unknown command") {
		t.Fatalf("an unknown command answered %v", err)
	}
	if _, err := Do("127.0.0.1:1", "PING"); err == nil {
		t.Fatal("PING to a closed port succeeded")
	}

	p := StartProtected(t, Protected{Password: "pw", User: "u", UserPassword: "upw"})
	if err := p.Ping(); err == nil || !strings.HasPrefix(err.Error(), "NOAUTH") {
		t.Fatalf("PING without a password answered %v", err)
	}
	if v, err := DoAs(p.Addr, "u", "upw", "PING"); v != "PONG" || err != nil {
		t.Fatalf("PING as an ACL user answered %v %v", v, err)
	}
	if _, err := DoAs(p.Addr, "u", "wrong", "PING"); err == nil || !strings.Contains(err.Error(), "WRONGPASS") {
		t.Fatalf("a wrong password answered %v", err)
	}
}
