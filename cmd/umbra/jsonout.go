package main

import (
	"bytes"
	"encoding/json"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// protoJSON is m as JSON whose 64-bit integers are numbers, as every
// other verb's --json writes them (protojson writes them as strings,
// which a script comparing sizes from `backup --json` with those of
// `images list --json` would have to convert). Field names are the
// proto names; unset fields are written with their zero values when
// unset is true.
func protoJSON(m proto.Message, indent string, unset bool) ([]byte, error) {
	b, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: unset}.Marshal(m)
	if err != nil {
		return nil, err
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		return nil, err
	}
	v = int64sAsNumbers(m.ProtoReflect().Descriptor(), v)
	if indent == "" {
		return json.Marshal(v)
	}
	return json.MarshalIndent(v, "", indent)
}

// int64sAsNumbers turns the strings protojson wrote for the 64-bit
// integer fields of message md (decoded into v) into numbers.
func int64sAsNumbers(md protoreflect.MessageDescriptor, v any) any {
	obj, ok := v.(map[string]any)
	if !ok || strings.HasPrefix(string(md.FullName()), "google.protobuf.") {
		return v // well-known types have JSON forms of their own
	}
	fields := md.Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		name := string(fd.Name())
		val, ok := obj[name]
		if !ok {
			continue
		}
		switch {
		case fd.IsMap():
			if m, ok := val.(map[string]any); ok {
				for k, e := range m {
					m[k] = fieldValue(fd.MapValue(), e)
				}
			}
		case fd.IsList():
			if l, ok := val.([]any); ok {
				for k, e := range l {
					l[k] = fieldValue(fd, e)
				}
			}
		default:
			obj[name] = fieldValue(fd, val)
		}
	}
	return obj
}

func fieldValue(fd protoreflect.FieldDescriptor, v any) any {
	switch fd.Kind() {
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind,
		protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		if s, ok := v.(string); ok {
			return json.Number(s)
		}
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return int64sAsNumbers(fd.Message(), v)
	}
	return v
}
