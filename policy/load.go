package policy

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// ErrInvalid is wrapped by every error that Load and Parse return for a bad
// config file, so callers can tell "the file is wrong" from "cannot read it".
var ErrInvalid = errors.New("policy: invalid config")

// Problem is one thing wrong with a config file.
type Problem struct {
	File string // path as given to Load, or the name given to Parse
	Line int    // 1-based; 0 when the parser cannot tell
	Col  int    // 1-based; 0 when unknown
	Key  string // key path such as "routes[2].upstream"; empty for syntax errors
	Msg  string
}

func (p Problem) String() string {
	var b strings.Builder
	b.WriteString(p.File)
	if p.Line > 0 {
		fmt.Fprintf(&b, ":%d", p.Line)
		if p.Col > 0 {
			fmt.Fprintf(&b, ":%d", p.Col)
		}
	}
	b.WriteString(": ")
	if p.Key != "" {
		b.WriteString(p.Key)
		b.WriteString(": ")
	}
	b.WriteString(p.Msg)
	return b.String()
}

// Error lists every problem found in one config file, one per line.
type Error struct{ Problems []Problem }

func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// Unwrap lets errors.Is(err, ErrInvalid) succeed.
func (e *Error) Unwrap() error { return ErrInvalid }

// Overrides are the few settings container users change most, taken from
// the environment; empty fields override nothing. The file stays the
// source of truth for everything else.
type Overrides struct {
	Listen      string // SIDECAR_LISTEN → server.listen
	AdminListen string // SIDECAR_ADMIN_LISTEN → server.admin_listen
	UpstreamURL string // SIDECAR_UPSTREAM_URL → the url of the only upstream
	RedisAddr   string // SIDECAR_REDIS_ADDR → redis.addrs = [it]
}

// OverridesFromEnv reads the SIDECAR_* overrides.
func OverridesFromEnv() Overrides {
	return Overrides{Listen: os.Getenv("SIDECAR_LISTEN"), AdminListen: os.Getenv("SIDECAR_ADMIN_LISTEN"),
		UpstreamURL: os.Getenv("SIDECAR_UPSTREAM_URL"), RedisAddr: os.Getenv("SIDECAR_REDIS_ADDR")}
}

// Load reads, strictly decodes, validates and compiles the config at path.
func Load(path string) (*Snapshot, error) { return LoadWith(path, Overrides{}) }

// LoadWith is Load with environment overrides applied before validation.
func LoadWith(path string, o Overrides) (*Snapshot, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("policy: read config: %w", err)
	}
	return parse(path, data, o)
}

// Parse is Load for a document already in memory; name is used in errors.
func Parse(name string, data []byte) (*Snapshot, error) { return parse(name, data, Overrides{}) }

func parse(name string, data []byte, o Overrides) (*Snapshot, error) {
	var f File
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		if p, ok := durationNotAString(name, data, err); ok {
			return nil, &Error{Problems: []Problem{p}}
		}
		return nil, &Error{Problems: decodeProblems(name, data, err)}
	}
	if p := o.apply(&f, name); p != nil {
		return nil, &Error{Problems: []Problem{*p}}
	}
	pos := indexPositions(data)
	v := validator{file: name, pos: pos}
	snap := v.compile(&f)
	if len(v.problems) > 0 {
		return nil, &Error{Problems: v.problems}
	}
	snap.Source = name
	snap.Files = append([]string{name}, snap.Files...)
	return snap, nil
}

// decodeProblems turns go-toml's errors into Problems with positions.
func decodeProblems(name string, data []byte, err error) []Problem {
	var sme *toml.StrictMissingError
	if errors.As(err, &sme) {
		out := make([]Problem, 0, len(sme.Errors))
		for i := range sme.Errors {
			de := &sme.Errors[i]
			line, col := de.Position()
			out = append(out, Problem{File: name, Line: line, Col: col,
				Key: strings.Join(de.Key(), "."), Msg: "unknown key"})
		}
		return out
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		line, col := de.Position()
		key := strings.Join(de.Key(), ".")
		if len(de.Key()) == 1 && data != nil {
			// A duplicate key comes with its own name only: the path is
			// the key defined at that position.
			walkKeyValues(data, func(k string, at unstable.Position, _ *unstable.Node) bool {
				if at.Line == line && at.Column == col && (k == key || strings.HasSuffix(k, "."+key)) {
					key = k
				}
				return true
			})
		}
		return []Problem{{File: name, Line: line, Col: col, Key: key, Msg: de.Error()}}
	}
	return []Problem{{File: name, Msg: err.Error()}}
}

// durationNotAString places the error of a duration written as a number
// (idle_timeout = 5): go-toml hands a non-string value's text to
// Duration.UnmarshalText and returns its error without a position, so
// the key is found here, as the first key the schema (File) types as a
// Duration whose value is not a string.
func durationNotAString(name string, data []byte, err error) (Problem, bool) {
	var de *toml.DecodeError
	if !errors.Is(err, errDuration) || errors.As(err, &de) {
		return Problem{}, false
	}
	var found Problem
	walkKeyValues(data, func(key string, at unstable.Position, value *unstable.Node) bool {
		if value == nil || value.Kind == unstable.String || schemaType(reflect.TypeOf(File{}), key) != reflect.TypeOf(Duration{}) {
			return true
		}
		found = Problem{File: name, Line: at.Line, Col: at.Column, Key: key,
			Msg: fmt.Sprintf("a duration is a string with a unit, such as \"%ss\" or \"%sms\", not %s", value.Data, value.Data, value.Data)}
		return false
	})
	return found, found.Key != ""
}

// schemaType is the Go type the TOML key path ("server.idle_timeout",
// "routes[1].timeout", "upstreams.app.breaker.sleep_window") decodes into
// within t, or nil when there is none.
func schemaType(t reflect.Type, key string) reflect.Type {
	for part := range strings.SplitSeq(key, ".") {
		name, indexed := strings.CutSuffix(part, "]")
		if indexed {
			name, _, _ = strings.Cut(name, "[")
		}
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		switch t.Kind() {
		case reflect.Map:
			t = t.Elem() // part is the map's key
			continue
		case reflect.Struct:
		default:
			return nil
		}
		f, ok := fieldByTOMLName(t, name)
		if !ok {
			return nil
		}
		t = f.Type
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		if indexed {
			if t.Kind() != reflect.Slice {
				return nil
			}
			t = t.Elem()
		}
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t
}

func fieldByTOMLName(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		if tag, _, _ := strings.Cut(f.Tag.Get("toml"), ","); tag == name {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

// indexPositions maps key paths ("server.listen", "routes[1].upstream",
// "upstreams.app") to where they stand in the document, so that validation
// errors, which go-toml cannot place, still point at a line.
func indexPositions(data []byte) map[string]unstable.Position {
	pos := make(map[string]unstable.Position)
	walkKeyValues(data, func(key string, at unstable.Position, _ *unstable.Node) bool {
		pos[key] = at
		return true
	})
	return pos
}

// walkKeyValues calls visit with the key path, position and value of each
// table header (value nil) and key/value line of the document, in order,
// until visit returns false.
func walkKeyValues(data []byte, visit func(key string, at unstable.Position, value *unstable.Node) bool) {
	p := unstable.Parser{KeepComments: false}
	p.Reset(data)
	arrayIdx := map[string]int{}
	table := ""
	keyPath := func(it unstable.Iterator) []string {
		var parts []string
		for it.Next() {
			parts = append(parts, string(it.Node().Data))
		}
		return parts
	}
	where := func(n *unstable.Node) unstable.Position {
		if n == nil {
			return unstable.Position{}
		}
		defer func() { _ = recover() }() // Range panics for data not in the input (escaped keys)
		return p.Shape(p.Range(n.Data)).Start
	}
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table:
			table = strings.Join(keyPath(e.Key()), ".")
			it := e.Key()
			it.Next()
			if !visit(table, where(it.Node()), nil) {
				return
			}
		case unstable.ArrayTable:
			name := strings.Join(keyPath(e.Key()), ".")
			idx := arrayIdx[name]
			arrayIdx[name] = idx + 1
			table = name + "[" + strconv.Itoa(idx) + "]"
			it := e.Key()
			it.Next()
			if !visit(table, where(it.Node()), nil) {
				return
			}
		case unstable.KeyValue:
			it := e.Key()
			var first *unstable.Node
			var parts []string
			for it.Next() {
				if first == nil {
					first = it.Node()
				}
				parts = append(parts, string(it.Node().Data))
			}
			k := strings.Join(parts, ".")
			if table != "" {
				k = table + "." + k
			}
			if !visit(k, where(first), e.Value()) {
				return
			}
		}
	}
}

func (o Overrides) apply(f *File, name string) *Problem {
	if o.Listen != "" {
		f.Server.Listen = &o.Listen
	}
	if o.AdminListen != "" {
		f.Server.AdminListen = &o.AdminListen
	}
	if o.RedisAddr != "" {
		f.Redis.Addrs = []string{o.RedisAddr}
	}
	if o.UpstreamURL != "" {
		if len(f.Upstreams) != 1 {
			return &Problem{File: "SIDECAR_UPSTREAM_URL", Msg: fmt.Sprintf("sets the url of the only upstream, but %s defines %d", name, len(f.Upstreams))}
		}
		for k, u := range f.Upstreams {
			u.URL, u.URLs = &o.UpstreamURL, nil
			f.Upstreams[k] = u
		}
	}
	return nil
}
