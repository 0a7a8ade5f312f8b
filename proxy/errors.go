package proxy

import (
	"errors"

	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/admission"
	"github.com/sidecar-proxy/sidecar/policy"
	"github.com/sidecar-proxy/sidecar/upstream"
)

// Sentinel errors of the forwarding path. Only this package maps them to
// HTTP statuses (statusFor); the text sent to clients is the fixed message
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
	ErrRateLimited     = admission.ErrRateLimited
	ErrUpgradeRefused  = errors.New("proxy: protocol upgrade not allowed")
)

// errorKind is the bounded label for sidecar_upstream_errors_total.
func errorKind(err error) string {
	switch {
	case errors.Is(err, ErrConnectRefused):
		return "refused"
	case errors.Is(err, ErrConnectTimeout):
		return "connect_timeout"
	case errors.Is(err, ErrUpstreamBusy):
		return "pool_exhausted"
	case errors.Is(err, ErrResponseTimeout):
		return "timeout"
	case errors.Is(err, ErrUpstreamReset):
		return "reset"
	case errors.Is(err, ErrUpstreamProto):
		return "protocol"
	case errors.Is(err, ErrUpstreamTLS):
		return "tls"
	default:
		return "other"
	}
}

func statusFor(err error) (int, string) {
	switch {
	case errors.Is(err, ErrNoRoute):
		return fasthttp.StatusNotFound, "no route for this request"
	case errors.Is(err, admission.ErrFailureLimited):
		return fasthttp.StatusTooManyRequests, "rate limit exceeded"
	case errors.Is(err, policy.ErrUnknownKey):
		return fasthttp.StatusUnauthorized, "unknown or revoked API key"
	case errors.Is(err, policy.ErrBadToken):
		return fasthttp.StatusUnauthorized, "invalid bearer token"
	case errors.Is(err, policy.ErrAmbiguousCredentials):
		return fasthttp.StatusBadRequest, "ambiguous credentials: send one API key or one bearer token, in one field"
	case errors.Is(err, ErrUpgradeRefused):
		return fasthttp.StatusNotImplemented, "protocol upgrade not supported"
	case errors.Is(err, ErrRateLimited):
		return fasthttp.StatusTooManyRequests, "rate limit exceeded"
	case errors.Is(err, ErrBadRequest):
		return fasthttp.StatusBadRequest, "malformed request"
	case errors.Is(err, ErrBodyTooLarge):
		return fasthttp.StatusRequestEntityTooLarge, "request body too large"
	case errors.Is(err, ErrClientBody):
		return fasthttp.StatusBadRequest, "malformed request body"
	case errors.Is(err, ErrUpstreamBusy):
		return fasthttp.StatusServiceUnavailable, "upstream saturated"
	case errors.Is(err, ErrConnectTimeout), errors.Is(err, ErrResponseTimeout):
		return fasthttp.StatusGatewayTimeout, "upstream timed out"
	default:
		return fasthttp.StatusBadGateway, "upstream unavailable"
	}
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

// classifyReadErr maps a failure while reading a response.
func classifyReadErr(err error) error { return upstream.ReadError(err) }
