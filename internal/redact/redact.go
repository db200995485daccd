// Package redact removes secrets from text before it is logged or printed:
// the user info of URLs (a NATS token is a URL's user name, so all of it
// goes, not only the password), password-like query parameters, and the
// password of a Postgres keyword/value connection string. It also gives flag
// values that show only their redacted form in help text.
package redact

import (
	"flag"
	"regexp"
)

// Mask replaces every secret.
const Mask = "REDACTED"

var (
	// scheme://userinfo@ — up to the last '@' before a space or a comma (a
	// comma separates the URLs of a NATS server list). A '@' later in a
	// URL's path hides its host too: over-redacting is the safe side.
	userInfo = regexp.MustCompile(`([A-Za-z][A-Za-z0-9+.-]*://)[^\s,@]*(?:@[^\s,@]*)*@`)
	// password=..., token=... in a query string or a keyword/value DSN; a
	// quoted DSN value may hold spaces.
	keyValue = regexp.MustCompile(`(?i)\b(password|passwd|pass|pwd|sslpassword|token|secret|auth_token)(\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)`)
)

// URL returns s with every secret replaced by Mask. s may be one URL, a
// comma-separated list of them, a keyword/value connection string, or any
// text that contains them (an error message).
func URL(s string) string {
	s = userInfo.ReplaceAllString(s, "${1}"+Mask+"@")
	return keyValue.ReplaceAllString(s, "${1}${2}"+Mask)
}

// URLVar defines a string flag holding a URL that may carry a secret: the
// value is used as given, but help text shows its default redacted.
func URLVar(fs *flag.FlagSet, p *string, name, value, usage string) {
	*p = value
	fs.Var((*urlValue)(p), name, usage)
}

// SecretVar defines a string flag holding a secret (a password, a token):
// help text shows Mask as its default when it has one, never the value.
func SecretVar(fs *flag.FlagSet, p *string, name, value, usage string) {
	*p = value
	fs.Var((*secretValue)(p), name, usage)
}

type urlValue string

func (v *urlValue) String() string {
	if v == nil {
		return ""
	}
	return URL(string(*v))
}

func (v *urlValue) Set(s string) error { *v = urlValue(s); return nil }

type secretValue string

func (v *secretValue) String() string {
	if v == nil || *v == "" {
		return ""
	}
	return Mask
}

func (v *secretValue) Set(s string) error { *v = secretValue(s); return nil }

// Error returns err with its message redacted (URL), keeping err in the
// chain for errors.Is and errors.As. A nil err gives nil.
func Error(err error) error {
	if err == nil {
		return nil
	}
	return &redacted{err}
}

type redacted struct{ err error }

func (e *redacted) Error() string { return URL(e.err.Error()) }
func (e *redacted) Unwrap() error { return e.err }
