package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/sidecar-proxy/sidecar/test/grpcbackend/grpcclient"
)

var bin string

// TestMain builds the program, so the tests run it as the end-to-end tests
// will: flags, the address on stdout, signals.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "grpcbackend-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin, err = grpcclient.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func TestUnary(t *testing.T) {
	b := grpcclient.Start(t, bin, "-name", "b1")
	c := grpcclient.Dial(t, b.Addr, nil)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "x-echo-color", "blue")
	var head, trail metadata.MD
	resp, err := c.UnaryCall(ctx, &testpb.SimpleRequest{ResponseSize: 1000, Payload: &testpb.Payload{Body: make([]byte, 10)}},
		grpc.Header(&head), grpc.Trailer(&trail))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetPayload().GetBody()) != 1000 || resp.GetServerId() != "b1" {
		t.Errorf("response: %d bytes from %q", len(resp.GetPayload().GetBody()), resp.GetServerId())
	}
	checkMD(t, "header", head, grpcclient.HeaderName, "b1")
	checkMD(t, "header", head, "x-echo-color", "blue")
	checkMD(t, "header", head, grpcclient.HeaderAuthority, b.Addr)
	checkDeadline(t, head, 5000)
	checkMD(t, "trailer", trail, grpcclient.TrailerMethod, "UnaryCall")
	checkMD(t, "trailer", trail, grpcclient.TrailerReceivedBytes, "10")
	checkDeadline(t, trail, 5000)

	// No deadline: "none".
	if _, err := c.UnaryCall(context.Background(), &testpb.SimpleRequest{}, grpc.Header(&head)); err != nil {
		t.Fatal(err)
	}
	checkMD(t, "header", head, grpcclient.HeaderDeadlineMS, "none")
}

func TestStatusOnRequest(t *testing.T) {
	b := grpcclient.Start(t, bin)
	c := grpcclient.Dial(t, b.Addr, nil)
	// grpc-message is percent-encoded on the wire (the '%'), and metadata
	// values are printable ASCII; the payload way carries any text.
	const msg = "quota exceeded: 100% used"
	const anyText = "ünïcode 100%\nsecond line"

	t.Run("metadata, trailers-only", func(t *testing.T) {
		ctx := metadata.AppendToOutgoingContext(context.Background(),
			grpcclient.WantStatus, strconv.Itoa(int(codes.ResourceExhausted)), grpcclient.WantMessage, msg)
		var head, trail metadata.MD
		_, err := c.UnaryCall(ctx, &testpb.SimpleRequest{ResponseSize: 10}, grpc.Header(&head), grpc.Trailer(&trail))
		checkStatus(t, err, codes.ResourceExhausted, msg)
		checkMD(t, "trailer", trail, grpcclient.TrailerMethod, "UnaryCall")
		checkMD(t, "header", head, grpcclient.HeaderName, "grpcbackend")
	})
	t.Run("payload (interop response_status)", func(t *testing.T) {
		_, err := c.UnaryCall(context.Background(), &testpb.SimpleRequest{ResponseStatus: &testpb.EchoStatus{Code: int32(codes.Unavailable), Message: anyText}})
		checkStatus(t, err, codes.Unavailable, anyText)
	})
	t.Run("after two stream messages", func(t *testing.T) {
		ctx := metadata.AppendToOutgoingContext(context.Background(),
			grpcclient.WantStatus, strconv.Itoa(int(codes.Aborted)), grpcclient.WantMessage, msg, grpcclient.WantStatusAfter, "2")
		stream, err := c.StreamingOutputCall(ctx, &testpb.StreamingOutputCallRequest{
			ResponseParameters: []*testpb.ResponseParameters{{Size: 1}, {Size: 2}, {Size: 3}},
		})
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for {
			if _, err = stream.Recv(); err != nil {
				break
			}
			n++
		}
		checkStatus(t, err, codes.Aborted, msg)
		if n != 2 {
			t.Errorf("got %d messages before the status, want 2", n)
		}
		checkMD(t, "trailer", stream.Trailer(), grpcclient.TrailerMethod, "StreamingOutputCall")
	})
	t.Run("delay past the deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		ctx = metadata.AppendToOutgoingContext(ctx, grpcclient.DelayMS, "5000")
		start := time.Now()
		_, err := c.UnaryCall(ctx, &testpb.SimpleRequest{})
		if status.Code(err) != codes.DeadlineExceeded || time.Since(start) > 4*time.Second {
			t.Errorf("got %v after %v, want DeadlineExceeded after ~100ms", err, time.Since(start))
		}
	})
}

func TestStreamingOutput(t *testing.T) {
	b := grpcclient.Start(t, bin)
	c := grpcclient.Dial(t, b.Addr, nil)
	stream, err := c.StreamingOutputCall(context.Background(), &testpb.StreamingOutputCallRequest{
		ResponseParameters: []*testpb.ResponseParameters{{Size: 10}, {Size: 20000, IntervalUs: 1000}, {Size: 0}},
	})
	if err != nil {
		t.Fatal(err)
	}
	var sizes []int
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		sizes = append(sizes, len(resp.GetPayload().GetBody()))
	}
	if fmt.Sprint(sizes) != "[10 20000 0]" {
		t.Errorf("sizes %v", sizes)
	}
	checkMD(t, "trailer", stream.Trailer(), grpcclient.TrailerMethod, "StreamingOutputCall")
}

func TestStreamingInput(t *testing.T) {
	b := grpcclient.Start(t, bin)
	c := grpcclient.Dial(t, b.Addr, nil)
	stream, err := c.StreamingInputCall(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{27182, 8, 1828, 45904} { // the interop sizes
		if err := stream.Send(&testpb.StreamingInputCallRequest{Payload: &testpb.Payload{Body: make([]byte, n)}}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetAggregatedPayloadSize(); got != 74922 {
		t.Errorf("aggregated %d, want 74922", got)
	}
	checkMD(t, "trailer", stream.Trailer(), grpcclient.TrailerReceivedBytes, "74922")
}

func TestFullDuplex(t *testing.T) {
	b := grpcclient.Start(t, bin)
	c := grpcclient.Dial(t, b.Addr, nil)

	t.Run("interop ping-pong", func(t *testing.T) {
		stream, err := c.FullDuplexCall(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range []int32{31415, 9, 2653, 58979} {
			if err := stream.Send(&testpb.StreamingOutputCallRequest{ResponseParameters: []*testpb.ResponseParameters{{Size: n}}}); err != nil {
				t.Fatal(err)
			}
			resp, err := stream.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if got := len(resp.GetPayload().GetBody()); got != int(n) {
				t.Errorf("got %d bytes, want %d", got, n)
			}
		}
		if err := stream.CloseSend(); err != nil {
			t.Fatal(err)
		}
		if _, err := stream.Recv(); err != io.EOF {
			t.Fatalf("after CloseSend: %v, want EOF", err)
		}
	})

	t.Run("echo", func(t *testing.T) {
		total := int64(100 << 20)
		if testing.Short() {
			total = 8 << 20
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		res, err := grpcclient.Echo(ctx, c, total, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		checkMD(t, "trailer", res.Trailer, grpcclient.TrailerReceivedBytes, strconv.FormatInt(total, 10))
		t.Logf("echoed %d MiB both ways in %v", total>>20, res.Elapsed)
	})
}

func TestTLS(t *testing.T) {
	certFile, keyFile, pool := writeCert(t)
	b := grpcclient.Start(t, bin, "-tls-cert", certFile, "-tls-key", keyFile)
	c := grpcclient.Dial(t, b.Addr, &tls.Config{RootCAs: pool})
	if _, err := c.UnaryCall(context.Background(), &testpb.SimpleRequest{ResponseSize: 1}); err != nil {
		t.Fatal(err)
	}
	res, err := grpcclient.Echo(context.Background(), c, 3<<20+7, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if res.Received != 3<<20+7 {
		t.Errorf("echoed %d bytes", res.Received)
	}
	// A plaintext client cannot talk to it.
	plain := grpcclient.Dial(t, b.Addr, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := plain.UnaryCall(ctx, &testpb.SimpleRequest{}); err == nil {
		t.Error("h2c call to the TLS backend succeeded")
	}
}

func TestBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-tls-cert", "x.pem"},
		{"-tls-cert", "missing.pem", "-tls-key", "missing.pem"},
		{"-addr", "256.0.0.1:0"},
	} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err == nil {
			t.Errorf("%v: exited 0: %s", args, out)
		}
	}
}

func checkMD(t *testing.T, what string, md metadata.MD, key, want string) {
	t.Helper()
	if got := md.Get(key); len(got) != 1 || got[0] != want {
		t.Errorf("%s %s = %q, want %q", what, key, got, want)
	}
}

func checkDeadline(t *testing.T, md metadata.MD, maxMS int64) {
	t.Helper()
	v := md.Get(grpcclient.HeaderDeadlineMS)
	if len(v) != 1 {
		t.Fatalf("%s: %q", grpcclient.HeaderDeadlineMS, v)
	}
	ms, err := strconv.ParseInt(v[0], 10, 64)
	if err != nil || ms <= 0 || ms > maxMS {
		t.Errorf("%s = %q, want 1..%d", grpcclient.HeaderDeadlineMS, v[0], maxMS)
	}
}

func checkStatus(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code || st.Message() != msg {
		t.Errorf("status %v %q, want %v %q", st.Code(), st.Message(), code, msg)
	}
}

// writeCert writes a self-signed certificate for 127.0.0.1 and its key as
// PEM files and returns their paths and a pool that trusts the certificate.
func writeCert(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(leaf)
	return certFile, keyFile, pool
}

// TestTrailersOnlyOnTheWire reads raw HTTP/2 responses with net/http: by
// default the status comes in trailers after a HEADERS frame; with
// x-trailers-only it comes in the one HEADERS frame (net/http puts it in
// resp.Header). grpc-timeout arrives as the deadline.
func TestTrailersOnlyOnTheWire(t *testing.T) {
	b := grpcclient.Start(t, bin)
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &p}
	defer tr.CloseIdleConnections()
	post := func(extra ...string) *http.Response {
		t.Helper()
		// An empty SimpleRequest: a gRPC frame header saying 0 bytes.
		req, err := http.NewRequest("POST", "http://"+b.Addr+"/grpc.testing.TestService/UnaryCall", strings.NewReader("\x00\x00\x00\x00\x00"))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("TE", "trailers")
		req.Header.Set("Grpc-Timeout", "3S")
		for i := 0; i < len(extra); i += 2 {
			req.Header.Set(extra[i], extra[i+1])
		}
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
			t.Errorf("HTTP %d over HTTP/%d", resp.StatusCode, resp.ProtoMajor)
		}
		return resp
	}

	resp := post(grpcclient.WantStatus, "8", grpcclient.WantMessage, "100% used")
	if resp.Header.Get("Grpc-Status") != "" || resp.Trailer.Get("Grpc-Status") != "8" || resp.Trailer.Get("Grpc-Message") != "100%25 used" {
		t.Errorf("default: header %v, trailer %v; want the status in the trailer", resp.Header, resp.Trailer)
	}
	if ms, _ := strconv.Atoi(resp.Header.Get(grpcclient.HeaderDeadlineMS)); ms <= 2000 || ms > 3000 {
		t.Errorf("grpc-timeout 3S arrived as %q ms", resp.Header.Get(grpcclient.HeaderDeadlineMS))
	}

	resp = post(grpcclient.WantStatus, "8", grpcclient.TrailersOnly, "1")
	if resp.Header.Get("Grpc-Status") != "8" || len(resp.Trailer) != 0 || resp.Header.Get(grpcclient.TrailerMethod) != "UnaryCall" {
		t.Errorf("trailers-only: header %v, trailer %v; want everything in one HEADERS frame", resp.Header, resp.Trailer)
	}
}
