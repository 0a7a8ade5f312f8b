package proxy

import (
	"bytes"
	"encoding/base64"
	"math"
	"strconv"
	"time"

	"github.com/valyala/fasthttp"
	"google.golang.org/protobuf/encoding/protowire"
)

// gRPC over the proxy. A gRPC client reads grpc-status, not the HTTP
// status, so the answers the sidecar makes itself to a gRPC request (rate
// limited, open circuit, no route, upstream down) are gRPC statuses in a
// trailers-only response: HTTP 200, content-type application/grpc, and
// grpc-status / grpc-message as header fields, with no body
// (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md).

// gRPC status codes (google.golang.org/grpc/codes) the sidecar answers
// with.
const (
	grpcDeadlineExceeded  = 4
	grpcResourceExhausted = 8
	grpcUnimplemented     = 12
	grpcInternal          = 13
	grpcUnavailable       = 14
	grpcUnauthenticated   = 16
)

// isGRPC reports whether the request is gRPC (its content-type is
// application/grpc, or application/grpc+proto and the like).
func isGRPC(h *fasthttp.RequestHeader) bool {
	ct := h.ContentType()
	return bytes.HasPrefix(ct, []byte("application/grpc")) &&
		(len(ct) == len("application/grpc") || ct[len("application/grpc")] == '+' || ct[len("application/grpc")] == ';')
}

// grpcCode is the gRPC status for the sidecar's own HTTP status: limits
// are RESOURCE_EXHAUSTED, a circuit open, shedding or an upstream down
// UNAVAILABLE, a timeout DEADLINE_EXCEEDED; the rest follow gRPC's HTTP
// mapping (doc/http-grpc-status-mapping.md).
func grpcCode(status int) int {
	switch status {
	case fasthttp.StatusTooManyRequests, fasthttp.StatusRequestEntityTooLarge:
		return grpcResourceExhausted
	case fasthttp.StatusGatewayTimeout:
		return grpcDeadlineExceeded
	case fasthttp.StatusNotFound, fasthttp.StatusNotImplemented:
		return grpcUnimplemented
	case fasthttp.StatusUnauthorized:
		return grpcUnauthenticated
	case fasthttp.StatusBadRequest, fasthttp.StatusInternalServerError:
		return grpcInternal
	default:
		return grpcUnavailable
	}
}

// grpcAnswer turns the local answer in the response (status and JSON
// error, or a configured fallback) into its trailers-only gRPC form. The
// sidecar's own fields stay (the request id, X-Sidecar-Fallback,
// Retry-After, RateLimit); a limit's retry delay also goes in
// grpc-status-details-bin as a google.rpc.RetryInfo, which gRPC clients
// and their retry policies read.
func (x *exchange) grpcAnswer(msg string) {
	resp := &x.r.ctx.Response
	code := grpcCode(x.r.status)
	resp.SetStatusCode(fasthttp.StatusOK)
	resp.ResetBody()
	rh := &resp.Header
	rh.SetContentType("application/grpc")
	rh.SetContentLength(0)
	rh.Set("Grpc-Status", strconv.Itoa(code))
	rh.Set("Grpc-Message", grpcPercentEncode(msg))
	if s := rh.Peek("Retry-After"); len(s) > 0 {
		if secs, err := strconv.Atoi(string(s)); err == nil {
			rh.Set("Grpc-Status-Details-Bin", retryStatus(code, msg, time.Duration(secs)*time.Second))
		}
	}
}

// grpcPercentEncode encodes a grpc-message value: printable ASCII but '%'
// as it is, the rest percent-encoded (PROTOCOL-HTTP2.md).
func grpcPercentEncode(s string) string {
	var b []byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c <= 0x7e && c != '%' {
			b = append(b, c)
			continue
		}
		b = append(b, '%', "0123456789ABCDEF"[c>>4], "0123456789ABCDEF"[c&15])
	}
	return string(b)
}

// retryStatus is a google.rpc.Status with one google.rpc.RetryInfo
// detail, protobuf-encoded and base64'd for grpc-status-details-bin.
func retryStatus(code int, msg string, delay time.Duration) string {
	var dur []byte // google.protobuf.Duration
	dur = protowire.AppendTag(dur, 1, protowire.VarintType)
	dur = protowire.AppendVarint(dur, uint64(delay/time.Second))
	var info []byte // google.rpc.RetryInfo{retry_delay = 1}
	info = protowire.AppendTag(info, 1, protowire.BytesType)
	info = protowire.AppendBytes(info, dur)
	var anyMsg []byte // google.protobuf.Any{type_url = 1, value = 2}
	anyMsg = protowire.AppendTag(anyMsg, 1, protowire.BytesType)
	anyMsg = protowire.AppendString(anyMsg, "type.googleapis.com/google.rpc.RetryInfo")
	anyMsg = protowire.AppendTag(anyMsg, 2, protowire.BytesType)
	anyMsg = protowire.AppendBytes(anyMsg, info)
	var st []byte // google.rpc.Status{code = 1, message = 2, details = 3}
	st = protowire.AppendTag(st, 1, protowire.VarintType)
	st = protowire.AppendVarint(st, uint64(code))
	st = protowire.AppendTag(st, 2, protowire.BytesType)
	st = protowire.AppendString(st, msg)
	st = protowire.AppendTag(st, 3, protowire.BytesType)
	st = protowire.AppendBytes(st, anyMsg)
	return base64.RawStdEncoding.EncodeToString(st)
}

// grpcTimeout parses a grpc-timeout value (1 to 8 digits and a unit: H, M,
// S, m, u, n); ok is false for anything else.
func grpcTimeout(v []byte) (d time.Duration, ok bool) {
	if len(v) < 2 || len(v) > 9 {
		return 0, false
	}
	n, err := strconv.ParseUint(string(v[:len(v)-1]), 10, 64)
	if err != nil {
		return 0, false
	}
	unit := map[byte]time.Duration{'H': time.Hour, 'M': time.Minute, 'S': time.Second,
		'm': time.Millisecond, 'u': time.Microsecond, 'n': time.Nanosecond}[v[len(v)-1]]
	if unit == 0 {
		return 0, false
	}
	if n > uint64(math.MaxInt64/unit) {
		// Valid (8 digits of hours is ~11,000 years), but beyond what a
		// Duration holds: no deadline that could ever pass, as grpc-go
		// clamps it.
		return 0, false
	}
	return time.Duration(n) * unit, true
}
