package test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/policy"
)

// pki makes a CA and certificates it signs, written as PEM files in dir.
type pki struct {
	t    *testing.T
	dir  string
	ca   *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newPKI(t *testing.T) *pki {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &pki{t: t, dir: t.TempDir(), ca: ca, key: key, pool: x509.NewCertPool()}
	p.pool.AddCert(ca)
	p.write("ca.pem", "CERTIFICATE", der)
	return p
}

func (p *pki) write(name, typ string, der []byte) string {
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		p.t.Fatal(err)
	}
	return path
}

// issue writes name.pem and name.key for a leaf certificate.
func (p *pki) issue(name, cn string, serial int64, client bool) tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	if client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.key)
	if err != nil {
		p.t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	// Write atomically: the sidecar may be reading the pair as it changes.
	certPath, keyPath := filepath.Join(p.dir, name+".pem"), filepath.Join(p.dir, name+".key")
	p.write(name+".pem.tmp", "CERTIFICATE", der)
	p.write(name+".key.tmp", "EC PRIVATE KEY", kder)
	os.Rename(certPath+".tmp", certPath)
	os.Rename(keyPath+".tmp", keyPath)
	c, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		p.t.Fatal(err)
	}
	return c
}

func TestTLSTermination(t *testing.T) {
	pk := newPKI(t)
	pk.issue("server", "localhost", 10, false)
	alice := pk.issue("alice", "alice", 20, true)
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s %s", r.Header.Get("X-Forwarded-Proto"), r.Header.Get("X-Sidecar-Client"), r.Header.Get("X-Sidecar-Tier"))
	})
	redirect := freeAddr(t)
	sc := startSidecar(t, fmt.Sprintf(`
[server.tls]
cert_file = %q
key_file = %q
client_ca_file = %q
client_auth = "request"
redirect_listen = %q
[identity]
client_cert_tier = "partner"
`, filepath.Join(pk.dir, "server.pem"), filepath.Join(pk.dir, "server.key"), filepath.Join(pk.dir, "ca.pem"), redirect)+routeTo(be.url(), ""))
	_ = sc

	client := func(certs []tls.Certificate, maxVersion uint16) *http.Client {
		return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: pk.pool, Certificates: certs, MaxVersion: maxVersion}}}
	}
	url := "https://" + sc.Addr + "/x"
	resp, err := client(nil, 0).Get(url)
	if err != nil {
		t.Fatalf("https without a client certificate: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "https ip:127.0.0.1 anonymous" {
		t.Errorf("anonymous over TLS: %q", b)
	}
	if resp.TLS == nil || resp.TLS.Version < tls.VersionTLS12 {
		t.Errorf("TLS version %v", resp.TLS)
	}
	resp, err = client([]tls.Certificate{alice}, 0).Get(url)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "https cert:alice partner" {
		t.Errorf("client certificate identity: %q", b)
	}
	if _, err := client(nil, tls.VersionTLS11).Get(url); err == nil {
		t.Errorf("a TLS 1.1 client was served")
	}

	// Plain HTTP on the redirect listener goes to HTTPS, method kept (308).
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err = noFollow.Get("http://" + redirect + "/some/path?q=1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	_, port, _ := net.SplitHostPort(sc.Addr)
	if resp.StatusCode != 308 || resp.Header.Get("Location") != "https://127.0.0.1:"+port+"/some/path?q=1" {
		t.Errorf("redirect: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}

	// A new certificate on disk is served without a restart.
	pk.issue("server", "localhost", 11, false)
	deadline := time.Now().Add(5 * time.Second)
	for {
		conn, err := tls.Dial("tcp", sc.Addr, &tls.Config{RootCAs: pk.pool, ServerName: "localhost"})
		if err == nil {
			serial := conn.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
			conn.Close()
			if serial == 11 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the renewed certificate was never served")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestRequiredClientCertificate(t *testing.T) {
	pk := newPKI(t)
	pk.issue("server", "localhost", 10, false)
	alice := pk.issue("alice", "alice", 20, true)
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, fmt.Sprintf("[server.tls]\ncert_file = %q\nkey_file = %q\nclient_ca_file = %q\nclient_auth = \"require\"\n",
		filepath.Join(pk.dir, "server.pem"), filepath.Join(pk.dir, "server.key"), filepath.Join(pk.dir, "ca.pem"))+routeTo(be.url(), ""))
	get := func(certs []tls.Certificate) error {
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pk.pool, Certificates: certs}}}
		resp, err := c.Get("https://" + sc.Addr + "/")
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	if err := get(nil); err == nil {
		t.Errorf("served a client without a certificate")
	}
	if err := get([]tls.Certificate{alice}); err != nil {
		t.Errorf("client with a certificate: %v", err)
	}
}

func TestHTTPSUpstream(t *testing.T) {
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "tls upstream, host %s", r.Host)
	}))
	defer up.Close()
	dir := t.TempDir()
	caPath := filepath.Join(dir, "upstream-ca.pem")
	os.WriteFile(caPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: up.Certificate().Raw}), 0o600)
	sc := startSidecar(t, routeTo(up.URL, fmt.Sprintf("ca_file = %q\nserver_name = \"example.com\"", caPath)))
	resp, body := get(t, sc.url("/"), nil)
	if resp.StatusCode != 200 || !strings.HasPrefix(body, "tls upstream") {
		t.Errorf("https upstream: %d %q", resp.StatusCode, body)
	}
	// Without the CA the upstream's certificate is refused: 502, kind tls.
	sc2 := startSidecar(t, routeTo(up.URL, ""))
	if resp, _ := get(t, sc2.url("/"), nil); resp.StatusCode != 502 {
		t.Errorf("untrusted upstream certificate: %d, want 502", resp.StatusCode)
	}
	if v := sc2.metric(`sidecar_upstream_errors_total{upstream="app",kind="tls"}`); v < 1 {
		t.Errorf("tls errors counted %v", v)
	}
}

// A reload that changes nothing of an https upstream (here: only the keys
// file) keeps its pooled connections: its CA bundle is compared by path
// and hash, not as a parsed pool (which never compares equal).
func TestReloadKeepsHTTPSUpstreamConnections(t *testing.T) {
	var conns atomic.Int32
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.Header.Get("X-Sidecar-Client"))
	}))
	up.Config.ConnState = func(c net.Conn, st http.ConnState) {
		if st == http.StateNew {
			conns.Add(1)
		}
	}
	up.StartTLS()
	defer up.Close()
	dir := t.TempDir()
	caPath := filepath.Join(dir, "upstream-ca.pem")
	os.WriteFile(caPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: up.Certificate().Raw}), 0o600)
	writeKeys(t, dir)
	sc := startSidecarIn(t, dir, tiersConfig+routeTo(up.URL, fmt.Sprintf("ca_file = %q\nserver_name = \"example.com\"", caPath)))
	if resp, body := get(t, sc.url("/"), map[string]string{"X-API-Key": "acme-secret-key"}); resp.StatusCode != 200 || body != "key:acme" {
		t.Fatalf("before the reload: %d %q", resp.StatusCode, body)
	}
	reloads := sc.metric(`sidecar_config_reloads_total{result="success"}`)
	keys := fmt.Sprintf("[[keys]]\nsha256 = %q\ntier = \"premium\"\nclient = \"newcomer\"\n", policy.HashKey("new-key"))
	if err := os.WriteFile(filepath.Join(dir, "keys.toml"), []byte(keys), 0o600); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for sc.metric(`sidecar_config_reloads_total{result="success"}`) == reloads && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if resp, body := get(t, sc.url("/"), map[string]string{"X-API-Key": "new-key"}); resp.StatusCode != 200 || body != "key:newcomer" {
		t.Fatalf("after the keys-only reload: %d %q", resp.StatusCode, body)
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("the upstream saw %d connections across a keys-only reload, want 1 (the pool was rebuilt)", n)
	}
}
