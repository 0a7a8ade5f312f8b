// Command grpcbackend is a gRPC backend for the end-to-end tests: it serves
// the interop TestService (google.golang.org/grpc/interop/grpc_testing), so
// no protoc is needed, and reports what reached it so a test can check what
// a proxy in front of it forwarded.
//
// It listens on -addr, plaintext (HTTP/2 with prior knowledge, h2c) unless
// -tls-cert and -tls-key are given, and prints the address it listens on as
// the first line of stdout once it accepts connections. SIGINT and SIGTERM
// stop it gracefully.
//
// Every RPC (the metadata names are constants in package grpcclient):
//   - sends header x-backend-name (-name) and x-backend-deadline-ms, the
//     time left until the call's deadline when it arrived, in whole
//     milliseconds, or "none": how a test sees that grpc-timeout was
//     forwarded (grpc-go does not show the raw header to handlers);
//   - sends x-backend-authority (the :authority it saw) and echoes every
//     request metadata key that starts with x-echo- as a header;
//   - ends with trailers x-backend-trailer (the method name),
//     x-backend-received-bytes (payload bytes received) and
//     x-backend-deadline-ms again, so they arrive even on errors;
//   - waits x-delay-ms milliseconds first, if asked, giving up when the call
//     ends (DEADLINE_EXCEEDED then comes from the deadline);
//   - ends with the status x-want-status (a code number) and grpc-message
//     x-want-message if asked, after x-want-status-after response messages
//     (default 0). The interop way, a response_status in the request, works
//     as well. grpc-go sends a HEADERS frame before the status whenever a
//     handler set header metadata, so for a true trailers-only response
//     (one HEADERS frame with END_STREAM, as gRPC's spec calls it) add
//     x-trailers-only: every header above then goes into the trailer.
//
// The methods follow the interop server: UnaryCall answers response_size
// zero bytes, StreamingOutputCall one message per response_parameters entry,
// StreamingInputCall the sum of the payload sizes. FullDuplexCall answers per
// request like StreamingOutputCall, and echoes the request payload when the
// request has no response_parameters: a client can stream any amount both
// ways (see grpcclient.Echo), message by message, with constant memory.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/sidecar-proxy/sidecar/test/grpcbackend/grpcclient"
)

func main() {
	log.SetPrefix("grpcbackend: ")
	log.SetFlags(0)
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on")
	name := flag.String("name", "grpcbackend", "sent in the x-backend-name header")
	certFile := flag.String("tls-cert", "", "PEM certificate: serve TLS (h2 by ALPN) instead of h2c; needs -tls-key")
	keyFile := flag.String("tls-key", "", "PEM private key for -tls-cert")
	maxMsg := flag.Int("max-msg-size", 16<<20, "largest message received or sent, in bytes")
	flag.Parse()

	opts := []grpc.ServerOption{grpc.MaxRecvMsgSize(*maxMsg), grpc.MaxSendMsgSize(*maxMsg)}
	if (*certFile == "") != (*keyFile == "") {
		log.Fatal("-tls-cert and -tls-key go together")
	}
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatal(err)
		}
		opts = append(opts, grpc.Creds(credentials.NewServerTLSFromCert(&cert)))
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	testpb.RegisterTestServiceServer(srv, &service{name: *name})

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		t := time.AfterFunc(5*time.Second, srv.Stop)
		srv.GracefulStop()
		t.Stop()
	}()

	fmt.Println(ln.Addr().String())
	if err := srv.Serve(ln); err != nil {
		log.Fatal(err)
	}
}

type service struct {
	testpb.UnimplementedTestServiceServer
	name string
}

// call is what one RPC learned from its metadata.
type call struct {
	ctx      context.Context
	method   string
	deadline string
	head     metadata.MD    // headers moved to the trailer (TrailersOnly)
	want     *status.Status // nil: succeed
	after    int            // response messages before want
	sent     int
	received int64
}

// begin reads the request metadata, sets the headers and waits x-delay-ms.
func (s *service) begin(ctx context.Context, method string) (*call, error) {
	c := &call{ctx: ctx, method: method, deadline: "none"}
	if d, ok := ctx.Deadline(); ok {
		c.deadline = strconv.FormatInt(time.Until(d).Milliseconds(), 10)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	head := metadata.Pairs(
		grpcclient.HeaderName, s.name,
		grpcclient.HeaderDeadlineMS, c.deadline,
		grpcclient.HeaderAuthority, strings.Join(md.Get(":authority"), ","),
	)
	for k, v := range md {
		if strings.HasPrefix(k, grpcclient.EchoPrefix) {
			head.Append(k, v...)
		}
	}
	if first(md, grpcclient.TrailersOnly) != "" {
		c.head = head // grpc-go sends headers first whenever some are set
	} else if err := grpc.SetHeader(ctx, head); err != nil {
		return nil, err
	}
	if v := first(md, grpcclient.WantStatus); v != "" {
		code, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "%s: %v", grpcclient.WantStatus, err)
		}
		c.want = status.New(codes.Code(code), first(md, grpcclient.WantMessage))
	}
	if v := first(md, grpcclient.WantStatusAfter); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "%s: %v", grpcclient.WantStatusAfter, err)
		}
		c.after = n
	}
	if v := first(md, grpcclient.DelayMS); v != "" {
		ms, err := strconv.Atoi(v)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "%s: %v", grpcclient.DelayMS, err)
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	return c, nil
}

// end sets the trailers and returns err, or the status the client asked
// for.
func (c *call) end(err error) error {
	trailer := metadata.Pairs(
		grpcclient.TrailerMethod, c.method,
		grpcclient.TrailerReceivedBytes, strconv.FormatInt(c.received, 10),
	)
	if c.head != nil {
		trailer = metadata.Join(trailer, c.head)
	} else {
		trailer.Set(grpcclient.HeaderDeadlineMS, c.deadline)
	}
	grpc.SetTrailer(c.ctx, trailer)
	if err == nil && c.want != nil {
		err = c.want.Err()
	}
	return err
}

// wantNow reports whether the asked-for status is due before the next
// response message.
func (c *call) wantNow() bool { return c.want != nil && c.sent >= c.after }

// echoStatus turns an interop response_status into the call's status.
func (c *call) echoStatus(es *testpb.EchoStatus) {
	if es != nil && es.GetCode() != 0 {
		c.want = status.New(codes.Code(es.GetCode()), es.GetMessage())
	}
}

func (s *service) UnaryCall(ctx context.Context, req *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	c, err := s.begin(ctx, "UnaryCall")
	if err != nil {
		return nil, err
	}
	c.received = int64(len(req.GetPayload().GetBody()))
	c.echoStatus(req.GetResponseStatus())
	if c.wantNow() {
		return nil, c.end(nil)
	}
	p, err := payload(req.GetResponseSize())
	if err != nil {
		return nil, c.end(err)
	}
	return &testpb.SimpleResponse{Payload: p, ServerId: s.name}, c.end(nil)
}

func (s *service) StreamingOutputCall(req *testpb.StreamingOutputCallRequest, stream grpc.ServerStreamingServer[testpb.StreamingOutputCallResponse]) error {
	c, err := s.begin(stream.Context(), "StreamingOutputCall")
	if err != nil {
		return err
	}
	c.received = int64(len(req.GetPayload().GetBody()))
	c.echoStatus(req.GetResponseStatus())
	return c.end(c.respond(req.GetResponseParameters(), stream))
}

func (s *service) StreamingInputCall(stream grpc.ClientStreamingServer[testpb.StreamingInputCallRequest, testpb.StreamingInputCallResponse]) error {
	c, err := s.begin(stream.Context(), "StreamingInputCall")
	if err != nil {
		return err
	}
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return c.end(err)
		}
		c.received += int64(len(req.GetPayload().GetBody()))
	}
	if c.wantNow() {
		return c.end(nil)
	}
	return c.end(stream.SendAndClose(&testpb.StreamingInputCallResponse{AggregatedPayloadSize: int32(c.received)}))
}

func (s *service) FullDuplexCall(stream grpc.BidiStreamingServer[testpb.StreamingOutputCallRequest, testpb.StreamingOutputCallResponse]) error {
	c, err := s.begin(stream.Context(), "FullDuplexCall")
	if err != nil {
		return err
	}
	for {
		if c.wantNow() {
			return c.end(nil)
		}
		req, err := stream.Recv()
		if err == io.EOF {
			return c.end(nil)
		}
		if err != nil {
			return c.end(err)
		}
		c.received += int64(len(req.GetPayload().GetBody()))
		c.echoStatus(req.GetResponseStatus())
		if params := req.GetResponseParameters(); len(params) > 0 {
			err = c.respond(params, stream)
		} else if !c.wantNow() {
			err = stream.Send(&testpb.StreamingOutputCallResponse{Payload: req.GetPayload()})
			c.sent++
		}
		if err != nil {
			return c.end(err)
		}
	}
}

// respond sends one message per entry of params, waiting each interval, and
// stops early when the asked-for status is due.
func (c *call) respond(params []*testpb.ResponseParameters, stream grpc.ServerStream) error {
	for _, rp := range params {
		if c.wantNow() {
			return nil
		}
		if us := rp.GetIntervalUs(); us > 0 {
			select {
			case <-time.After(time.Duration(us) * time.Microsecond):
			case <-c.ctx.Done():
				return status.FromContextError(c.ctx.Err()).Err()
			}
		}
		p, err := payload(rp.GetSize())
		if err != nil {
			return err
		}
		if err := stream.SendMsg(&testpb.StreamingOutputCallResponse{Payload: p}); err != nil {
			return err
		}
		c.sent++
	}
	return nil
}

func payload(size int32) (*testpb.Payload, error) {
	if size < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "negative response size %d", size)
	}
	return &testpb.Payload{Type: testpb.PayloadType_COMPRESSABLE, Body: make([]byte, size)}, nil
}

func first(md metadata.MD, key string) string {
	if v := md.Get(key); len(v) > 0 {
		return v[0]
	}
	return ""
}
