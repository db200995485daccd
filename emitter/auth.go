package emitter

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Request signing of the HTTP ingest, the scheme Stripe and others use:
//
//	X-Buildstate-Signature: t=<unix seconds>,v1=<hex>
//
// where <hex> is HMAC-SHA256, keyed with a shared secret, of "<t>.<raw body>".
// A signature is good within SignatureTolerance of the server's clock, which
// bounds how long a captured request can be replayed (and a replayed event is
// deduplicated by its id anyway). Several v1 entries may be given; any that
// matches verifies.
const (
	SignatureHeader    = "X-Buildstate-Signature"
	SignatureTolerance = 5 * time.Minute
	// MinSecretLen is the shortest secret accepted, in bytes.
	MinSecretLen = 16
)

// ErrUnauthenticated is in the chain of every signature that does not verify.
var ErrUnauthenticated = errors.New("unauthenticated")

// Sign returns the X-Buildstate-Signature value for body sent at t.
func Sign(secret []byte, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac(secret, ts, body))
}

func mac(secret []byte, ts string, body []byte) []byte {
	h := hmac.New(sha256.New, secret)
	h.Write([]byte(ts))
	h.Write([]byte{'.'})
	h.Write(body)
	return h.Sum(nil)
}

// Verifier checks signatures against a set of secrets: any of them verifies,
// so a secret is rotated by adding the new one, moving the clients to it,
// then removing the old one.
type Verifier struct {
	secrets [][]byte
	now     func() time.Time
}

// NewVerifier returns a Verifier of secrets; it refuses an empty set and any
// secret shorter than MinSecretLen.
func NewVerifier(secrets []string) (*Verifier, error) {
	if len(secrets) == 0 {
		return nil, errors.New("no HMAC secret given")
	}
	v := &Verifier{now: time.Now}
	for i, s := range secrets {
		if len(s) < MinSecretLen {
			return nil, fmt.Errorf("HMAC secret %d of %d is %d bytes; want at least %d (e.g. openssl rand -hex 32)",
				i+1, len(secrets), len(s), MinSecretLen)
		}
		v.secrets = append(v.secrets, []byte(s))
	}
	return v, nil
}

// ParseSecrets splits a list of secrets, one per line (a secrets file) or
// comma-separated (an environment variable), dropping surrounding blanks,
// empty entries and, in a file, lines starting with '#'.
func ParseSecrets(s string, sep string) []string {
	var out []string
	for _, part := range strings.Split(s, sep) {
		part = strings.TrimSpace(part)
		if part == "" || sep == "\n" && strings.HasPrefix(part, "#") {
			continue
		}
		out = append(out, part)
	}
	return out
}

// signature is a parsed X-Buildstate-Signature header.
type signature struct {
	ts   string
	sums [][]byte
}

// parse reads header and checks its time, before the body is read.
func (v *Verifier) parse(header string) (signature, error) {
	if header == "" {
		return signature{}, fmt.Errorf("%w: no %s header", ErrUnauthenticated, SignatureHeader)
	}
	var sig signature
	for _, part := range strings.Split(header, ",") {
		k, val, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return signature{}, fmt.Errorf("%w: malformed %s header: want t=<unix seconds>,v1=<hex>", ErrUnauthenticated, SignatureHeader)
		}
		switch k {
		case "t":
			sig.ts = val
		case "v1":
			sum, err := hex.DecodeString(val)
			if err != nil || len(sum) != sha256.Size {
				return signature{}, fmt.Errorf("%w: malformed %s header: v1 is not 64 hex digits", ErrUnauthenticated, SignatureHeader)
			}
			sig.sums = append(sig.sums, sum)
		}
	}
	t, err := strconv.ParseInt(sig.ts, 10, 64)
	if err != nil || len(sig.sums) == 0 {
		return signature{}, fmt.Errorf("%w: malformed %s header: want t=<unix seconds>,v1=<hex>", ErrUnauthenticated, SignatureHeader)
	}
	if skew := v.now().Sub(time.Unix(t, 0)); skew > SignatureTolerance || skew < -SignatureTolerance {
		return signature{}, fmt.Errorf("%w: signature time t=%d is more than %s from the server's clock", ErrUnauthenticated, t, SignatureTolerance)
	}
	return sig, nil
}

// check reports whether sig signs body with one of the secrets, comparing
// in constant time.
func (v *Verifier) check(sig signature, body []byte) error {
	ok := false
	for _, secret := range v.secrets {
		want := mac(secret, sig.ts, body)
		for _, sum := range sig.sums {
			if hmac.Equal(sum, want) {
				ok = true
			}
		}
	}
	if !ok {
		return fmt.Errorf("%w: the signature does not match the body with any of the server's secrets", ErrUnauthenticated)
	}
	return nil
}

// Verify checks the X-Buildstate-Signature header value of body.
func (v *Verifier) Verify(header string, body []byte) error {
	sig, err := v.parse(header)
	if err != nil {
		return err
	}
	return v.check(sig, body)
}
