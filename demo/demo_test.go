package demo

import (
	"encoding/json"
	"net/http/httptest"
	"testing"
)

func TestHello(t *testing.T) {
	f := func(path, requestID, want string) {
		t.Helper()
		r := httptest.NewRequest("GET", "/", nil)
		r.URL.Path = path
		r.Header.Set("X-Request-Id", requestID)
		w := httptest.NewRecorder()
		Handler().ServeHTTP(w, r)
		if ct := w.Header().Get("Content-Type"); ct != "application/json" {
			t.Fatalf("%q: Content-Type %q", path, ct)
		}
		if got := w.Body.String(); got != want {
			t.Fatalf("%q: body\n%s\nwant\n%s", path, got, want)
		}
		var h hello
		if err := json.Unmarshal(w.Body.Bytes(), &h); err != nil {
			t.Fatalf("%q: %v", path, err)
		}
	}
	f("/hello", "r1", `{"hello":"from the demo upstream","path":"/hello","request_id":"r1"}`+"\n")
	f("/a&b<c>", "", `{"hello":"from the demo upstream","path":"/a&b<c>","request_id":""}`+"\n")
	f("/q\"\\\x01", "", `{"hello":"from the demo upstream","path":"/q\"\\\u0001","request_id":""}`+"\n")
	f("/\xff", "", `{"hello":"from the demo upstream","path":"/\ufffd","request_id":""}`+"\n")
}
