package proxy

import (
	"errors"
	"os"

	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/admission"
	"github.com/sidecar-proxy/sidecar/breaker"
	"github.com/sidecar-proxy/sidecar/policy"
	"github.com/sidecar-proxy/sidecar/upstream"
)

// Sentinel errors of the forwarding path. Only this package maps them to
// HTTP statuses (errorAnswers); the text sent to clients is the fixed message
// below, never err.Error(), which may quote upstream bytes.
var (
	ErrNoRoute         = admission.ErrNoRoute
	ErrBadRequest      = errors.New("proxy: malformed request")
	ErrBodyTooLarge    = errors.New("proxy: request body too large")
	ErrConnectRefused  = upstream.ErrConnectRefused
	ErrConnectTimeout  = upstream.ErrConnectTimeout
	ErrUpstreamBusy    = upstream.ErrBusy
	ErrResponseTimeout = upstream.ErrTimeout
	ErrUpstreamReset   = upstream.ErrReset
	ErrUpstreamProto   = upstream.ErrProtocol
	ErrUpstreamTLS     = upstream.ErrTLS
	ErrClientBody      = upstream.ErrRequestBody
	ErrClientGone      = errors.New("proxy: writing to the client failed")
	ErrClientCanceled  = upstream.ErrCanceled
	ErrClientDeadline  = errors.New("proxy: the client's deadline passed before the upstream answered")
	ErrRateLimited     = admission.ErrRateLimited
	ErrUpgradeRefused  = errors.New("proxy: protocol upgrade not allowed")
	ErrConnectMethod   = errors.New("proxy: CONNECT is not served")
)

// errorAnswer is the row of the error table that answers for err.
type errorAnswer struct {
	err     error
	status  int
	message string // what the client reads: fixed text, never err.Error()
	kind    string // sidecar_upstream_errors_total's kind; "" for errors that are not the upstream's
	reason  string // X-Sidecar-Fallback and sidecar_fallbacks_total's reason, when a fallback answers
}

// errorAnswers is the one table from error to answer, metric label and
// fallback reason, read top to bottom (the first row err matches wins:
// a body too large is also a client body error).
var errorAnswers = [...]errorAnswer{
	{ErrNoRoute, fasthttp.StatusNotFound, "no route for this request", "", ""},
	{admission.ErrFailureLimited, fasthttp.StatusTooManyRequests, "rate limit exceeded", "", ""},
	{policy.ErrUnknownKey, fasthttp.StatusUnauthorized, "unknown or revoked API key", "", ""},
	{policy.ErrBadToken, fasthttp.StatusUnauthorized, "invalid bearer token", "", ""},
	{policy.ErrAmbiguousCredentials, fasthttp.StatusBadRequest,
		"ambiguous credentials: send one API key or one bearer token, in one field", "", ""},
	{ErrUpgradeRefused, fasthttp.StatusNotImplemented, "protocol upgrade not supported", "", ""},
	{ErrConnectMethod, fasthttp.StatusNotImplemented, "CONNECT not supported", "", ""},
	{ErrRateLimited, fasthttp.StatusTooManyRequests, "rate limit exceeded", "", ""},
	{ErrBadRequest, fasthttp.StatusBadRequest, "malformed request", "", ""},
	{ErrBodyTooLarge, fasthttp.StatusRequestEntityTooLarge, "request body too large", "", ""},
	{ErrClientBody, fasthttp.StatusBadRequest, "malformed request body", "", ""},
	{ErrClientGone, fasthttp.StatusBadGateway, "upstream unavailable", "", ""},
	// NGINX's 499: nobody reads it, the access log and metrics do.
	{ErrClientCanceled, 499, "client closed request", "", ""},
	// A gRPC client's own deadline (grpc-timeout): DEADLINE_EXCEEDED, as
	// the upstream's timeout is, but not the upstream's failure.
	{ErrClientDeadline, fasthttp.StatusGatewayTimeout, "deadline exceeded", "", ""},
	{breaker.ErrOpen, fasthttp.StatusServiceUnavailable, "upstream circuit open", "", "open"},
	{breaker.ErrSaturated, fasthttp.StatusServiceUnavailable, "upstream saturated", "", "saturated"},
	{ErrUpstreamBusy, fasthttp.StatusServiceUnavailable, "upstream saturated", "pool_exhausted", "saturated"},
	{ErrConnectTimeout, fasthttp.StatusGatewayTimeout, "upstream timed out", "connect_timeout", "timeout"},
	{ErrResponseTimeout, fasthttp.StatusGatewayTimeout, "upstream timed out", "timeout", "timeout"},
	{ErrConnectRefused, fasthttp.StatusBadGateway, "upstream unavailable", "refused", "error"},
	{ErrUpstreamReset, fasthttp.StatusBadGateway, "upstream unavailable", "reset", "error"},
	{ErrUpstreamProto, fasthttp.StatusBadGateway, "upstream unavailable", "protocol", "error"},
	{ErrUpstreamTLS, fasthttp.StatusBadGateway, "upstream unavailable", "tls", "error"},
}

// otherError answers what no row names: an upstream failure of no known
// kind.
var otherError = errorAnswer{nil, fasthttp.StatusBadGateway, "upstream unavailable", "other", "error"}

// clientBodyTimeout answers a request body that stopped coming: for
// idle_timeout, or, while the upstream waited for it, for
// response_timeout (an upload's progress extends that wait, so it ran out
// only because the client sent nothing).
var clientBodyTimeout = errorAnswer{ErrClientBody, fasthttp.StatusRequestTimeout, "request body timed out", "", ""}

// answerFor returns err's row of the error table.
func answerFor(err error) *errorAnswer {
	if errors.Is(err, ErrClientBody) && errors.Is(err, os.ErrDeadlineExceeded) {
		return &clientBodyTimeout
	}
	for i := range errorAnswers {
		if errors.Is(err, errorAnswers[i].err) {
			return &errorAnswers[i]
		}
	}
	return &otherError
}

// clientSide reports whether err is the client's doing (its body, or its
// connection), not the upstream's.
func clientSide(err error) bool {
	return errors.Is(err, ErrClientBody) || errors.Is(err, ErrBodyTooLarge) || errors.Is(err, ErrClientGone) ||
		errors.Is(err, ErrClientCanceled) || errors.Is(err, ErrClientDeadline)
}

// writeError replaces whatever response was being built with a short JSON
// error: {"error":"...","request_id":"..."}.
func writeError(ctx *fasthttp.RequestCtx, status int, msg string, requestID []byte, idHeader string) {
	ctx.Response.Reset()
	ctx.Response.SetStatusCode(status)
	ctx.Response.Header.SetContentType("application/json")
	if len(requestID) > 0 {
		ctx.Response.Header.SetBytesV(idHeader, requestID)
	}
	b := ctx.Response.Body()[:0]
	b = append(b, `{"error":"`...)
	b = append(b, msg...)
	b = append(b, `","request_id":"`...)
	b = append(b, requestID...) // validated: visible ASCII without quotes or backslashes
	b = append(b, "\"}\n"...)
	ctx.Response.SetBodyRaw(b)
}
