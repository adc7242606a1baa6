package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire constants from the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
const (
	magicNBD        = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt   = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply   = 0x0003e889045565a9
	magicRequest    = 0x25609513
	magicSimple     = 0x67446698
	magicStructured = 0x668e33ef

	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	clientFixedNewstyle = 1 << 0
	clientNoZeroes      = 1 << 1

	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
	optExtendedHeaders = 11

	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrPolicy   = 1<<31 + 2
	repErrInvalid  = 1<<31 + 3
	repErrPlatform = 1<<31 + 4
	repErrTLSReqd  = 1<<31 + 5
	repErrUnknown  = 1<<31 + 6
	repErrTooBig   = 1<<31 + 9

	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3

	tfHasFlags        = 1 << 0
	tfReadOnly        = 1 << 1
	tfSendFlush       = 1 << 2
	tfSendFUA         = 1 << 3
	tfSendTrim        = 1 << 5
	tfSendWriteZeroes = 1 << 6
	tfCanMultiConn    = 1 << 8
	tfSendCache       = 1 << 10
	tfSendFastZero    = 1 << 11

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4

	replyFlagDone    = 1 << 0
	replyNone        = 0
	replyOffsetData  = 1
	replyOffsetHole  = 2
	replyBlockStatus = 5
	replyError       = 1<<15 + 1

	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108

	stateHole  = 1 << 0 // base:allocation
	stateZero  = 1 << 1
	stateDirty = 1 << 0 // umbra:changed:<snapshot>

	maxOptionLen = 64 << 10
	// MaxBlock is the largest request payload the server accepts.
	MaxBlock = 32 << 20
)

// ErrProtocol reports a peer that broke the protocol.
var ErrProtocol = errors.New("nbd protocol violation")

// option is one option request from the client during the handshake.
type option struct {
	code uint32
	data []byte
}

// decodeOptionHeader decodes the 16-byte header of an option request.
func decodeOptionHeader(b []byte) (code, length uint32, err error) {
	if len(b) < 16 {
		return 0, 0, fmt.Errorf("option header of %d bytes: %w", len(b), ErrProtocol)
	}
	if m := binary.BigEndian.Uint64(b); m != magicIHaveOpt {
		return 0, 0, fmt.Errorf("option magic %#x: %w", m, ErrProtocol)
	}
	code = binary.BigEndian.Uint32(b[8:])
	length = binary.BigEndian.Uint32(b[12:])
	if length > maxOptionLen {
		return 0, 0, fmt.Errorf("option %d with %d bytes of data: %w", code, length, ErrProtocol)
	}
	return code, length, nil
}

// infoRequest is the payload of NBD_OPT_INFO and NBD_OPT_GO.
type infoRequest struct {
	name  string
	infos []uint16
}

func decodeInfoRequest(b []byte) (infoRequest, error) {
	var r infoRequest
	if len(b) < 4 {
		return r, fmt.Errorf("info request of %d bytes: %w", len(b), ErrProtocol)
	}
	n := binary.BigEndian.Uint32(b)
	if uint64(n)+6 > uint64(len(b)) {
		return r, fmt.Errorf("info request name of %d bytes in %d: %w", n, len(b), ErrProtocol)
	}
	if n > maxString {
		return r, fmt.Errorf("export name of %d bytes, more than the protocol's %d: %w", n, maxString, ErrProtocol)
	}
	r.name = string(b[4 : 4+n])
	rest := b[4+n:]
	k := binary.BigEndian.Uint16(rest)
	rest = rest[2:]
	if int(k)*2 != len(rest) {
		return r, fmt.Errorf("info request lists %d items in %d bytes: %w", k, len(rest), ErrProtocol)
	}
	for i := 0; i < int(k); i++ {
		r.infos = append(r.infos, binary.BigEndian.Uint16(rest[2*i:]))
	}
	return r, nil
}

// metaRequest is the payload of NBD_OPT_LIST/SET_META_CONTEXT.
type metaRequest struct {
	export  string
	queries []string
}

func decodeMetaRequest(b []byte) (metaRequest, error) {
	var r metaRequest
	if len(b) < 8 {
		return r, fmt.Errorf("meta context request of %d bytes: %w", len(b), ErrProtocol)
	}
	n := binary.BigEndian.Uint32(b)
	if uint64(n)+8 > uint64(len(b)) {
		return r, fmt.Errorf("meta context export name of %d bytes: %w", n, ErrProtocol)
	}
	if n > maxString {
		return r, fmt.Errorf("export name of %d bytes, more than the protocol's %d: %w", n, maxString, ErrProtocol)
	}
	r.export = string(b[4 : 4+n])
	rest := b[4+n:]
	k := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	for i := uint32(0); i < k; i++ {
		if len(rest) < 4 {
			return r, fmt.Errorf("meta context query %d truncated: %w", i, ErrProtocol)
		}
		l := binary.BigEndian.Uint32(rest)
		if uint64(l)+4 > uint64(len(rest)) {
			return r, fmt.Errorf("meta context query %d of %d bytes: %w", i, l, ErrProtocol)
		}
		r.queries = append(r.queries, string(rest[4:4+l]))
		rest = rest[4+l:]
	}
	if len(rest) != 0 {
		return r, fmt.Errorf("meta context request has %d trailing bytes: %w", len(rest), ErrProtocol)
	}
	return r, nil
}

// request is one transmission-phase request.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

const requestSize = 28

func decodeRequest(b []byte) (request, error) {
	var r request
	if len(b) < requestSize {
		return r, fmt.Errorf("request of %d bytes: %w", len(b), ErrProtocol)
	}
	if m := binary.BigEndian.Uint32(b); m != magicRequest {
		return r, fmt.Errorf("request magic %#x: %w", m, ErrProtocol)
	}
	r.flags = binary.BigEndian.Uint16(b[4:])
	r.typ = binary.BigEndian.Uint16(b[6:])
	r.cookie = binary.BigEndian.Uint64(b[8:])
	r.offset = binary.BigEndian.Uint64(b[16:])
	r.length = binary.BigEndian.Uint32(b[24:])
	return r, nil
}

func (r request) encode() []byte {
	b := make([]byte, requestSize)
	binary.BigEndian.PutUint32(b, magicRequest)
	binary.BigEndian.PutUint16(b[4:], r.flags)
	binary.BigEndian.PutUint16(b[6:], r.typ)
	binary.BigEndian.PutUint64(b[8:], r.cookie)
	binary.BigEndian.PutUint64(b[16:], r.offset)
	binary.BigEndian.PutUint32(b[24:], r.length)
	return b
}

func optReply(opt, typ uint32, data []byte) []byte {
	b := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint64(b, magicOptReply)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	return append(b, data...)
}

func simpleReplyHeader(b []byte, errno uint32, cookie uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, magicSimple)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, cookie)
}

func structuredHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) []byte {
	b = binary.BigEndian.AppendUint32(b, magicStructured)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint32(b, length)
}
