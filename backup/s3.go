package backup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"sort"
	"strings"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// s3Backend keeps objects in a bucket under a prefix. An S3 PUT is atomic
// and durable when it returns, so Sync has nothing to do. minio-go
// retries failed requests with backoff (a restarting server is waited
// for, up to its retry limit), then the error reaches the caller.
type s3Backend struct {
	c      *minio.Client
	bucket string
	prefix string // "" or ending in "/"
	loc    string
}

func openS3(location string, cred Credentials) (*s3Backend, error) {
	secure := strings.HasPrefix(location, "s3://")
	u, err := url.Parse("http://" + strings.SplitN(location, "://", 2)[1])
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("repository %q: want s3://HOST[:PORT]/BUCKET[/PREFIX]", location)
	}
	parts := strings.SplitN(strings.Trim(u.Path, "/"), "/", 2)
	if parts[0] == "" {
		return nil, fmt.Errorf("repository %q: no bucket (want s3://HOST[:PORT]/BUCKET[/PREFIX])", location)
	}
	if cred.AccessKey == "" {
		cred.AccessKey = os.Getenv("AWS_ACCESS_KEY_ID")
	}
	if cred.SecretKey == "" {
		cred.SecretKey = os.Getenv("AWS_SECRET_ACCESS_KEY")
	}
	if cred.AccessKey == "" || cred.SecretKey == "" {
		return nil, fmt.Errorf("repository %s: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)", location)
	}
	c, err := minio.New(u.Host, &minio.Options{
		Creds:  credentials.NewStaticV4(cred.AccessKey, cred.SecretKey, ""),
		Secure: secure,
		Region: "us-east-1",
	})
	if err != nil {
		return nil, fmt.Errorf("repository %s: %w", location, err)
	}
	b := &s3Backend{c: c, bucket: parts[0], loc: location}
	if len(parts) == 2 && parts[1] != "" {
		b.prefix = parts[1] + "/"
	}
	return b, nil
}

func (b *s3Backend) Location() string { return b.loc }

// ensureBucket creates the bucket when it is missing (repo init).
func (b *s3Backend) ensureBucket(ctx context.Context) error {
	ok, err := b.c.BucketExists(ctx, b.bucket)
	if err != nil {
		return fmt.Errorf("repository %s: %w", b.loc, err)
	}
	if !ok {
		if err := b.c.MakeBucket(ctx, b.bucket, minio.MakeBucketOptions{}); err != nil {
			return fmt.Errorf("repository %s: create bucket: %w", b.loc, err)
		}
	}
	return nil
}

func (b *s3Backend) Put(ctx context.Context, name string, data []byte) error {
	_, err := b.c.PutObject(ctx, b.bucket, b.prefix+name, bytes.NewReader(data), int64(len(data)),
		minio.PutObjectOptions{ContentType: "application/octet-stream", DisableMultipart: true})
	if err != nil {
		return fmt.Errorf("put %s/%s%s: %w", b.bucket, b.prefix, name, err)
	}
	return nil
}

func notFound(err error) bool {
	var r minio.ErrorResponse
	return errors.As(err, &r) && (r.Code == "NoSuchKey" || r.StatusCode == 404)
}

func (b *s3Backend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	return b.GetInto(ctx, name, off, length, nil)
}

// GetInto reads a known length straight from the response into buf (or
// new memory of that size); to the end of an object (length < 0), of a
// size not known before, into memory that grows as it is read.
func (b *s3Backend) GetInto(ctx context.Context, name string, off, length int64, buf []byte) ([]byte, error) {
	opts := minio.GetObjectOptions{}
	if off > 0 || length >= 0 {
		end := int64(-1)
		if length >= 0 {
			if length == 0 {
				return []byte{}, nil
			}
			end = off + length - 1
		}
		var err error
		if end >= 0 {
			err = opts.SetRange(off, end)
		} else {
			err = opts.SetRange(off, 0)
		}
		if err != nil {
			return nil, err
		}
	}
	obj, err := b.c.GetObject(ctx, b.bucket, b.prefix+name, opts)
	if err != nil {
		return nil, b.wrap(name, err)
	}
	defer obj.Close()
	if length < 0 {
		data, err := io.ReadAll(obj)
		if err != nil {
			return nil, b.wrap(name, err)
		}
		return data, nil
	}
	if int64(cap(buf)) < length {
		buf = make([]byte, length)
	}
	buf = buf[:length]
	if _, err := io.ReadFull(obj, buf); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil, fmt.Errorf("get %s/%s%s: %d bytes at %d: %w", b.bucket, b.prefix, name, length, off, io.ErrUnexpectedEOF)
		}
		return nil, b.wrap(name, err)
	}
	return buf, nil
}

func (b *s3Backend) wrap(name string, err error) error {
	if notFound(err) {
		return fmt.Errorf("get %s/%s%s: %w", b.bucket, b.prefix, name, fs.ErrNotExist)
	}
	return fmt.Errorf("get %s/%s%s: %w", b.bucket, b.prefix, name, err)
}

func (b *s3Backend) Has(ctx context.Context, name string) (bool, error) {
	_, err := b.c.StatObject(ctx, b.bucket, b.prefix+name, minio.StatObjectOptions{})
	if notFound(err) {
		return false, nil
	}
	return err == nil, err
}

func (b *s3Backend) Size(ctx context.Context, name string) (int64, error) {
	st, err := b.c.StatObject(ctx, b.bucket, b.prefix+name, minio.StatObjectOptions{})
	if err != nil {
		return 0, b.wrap(name, err)
	}
	return st.Size, nil
}

func (b *s3Backend) List(ctx context.Context, prefix string) ([]string, error) {
	var out []string
	for o := range b.c.ListObjects(ctx, b.bucket, minio.ListObjectsOptions{Prefix: b.prefix + prefix, Recursive: true}) {
		if o.Err != nil {
			if notFound(o.Err) {
				break
			}
			return nil, fmt.Errorf("list %s/%s%s: %w", b.bucket, b.prefix, prefix, o.Err)
		}
		out = append(out, strings.TrimPrefix(o.Key, b.prefix))
	}
	sort.Strings(out)
	return out, nil
}

func (b *s3Backend) Delete(ctx context.Context, name string) error {
	err := b.c.RemoveObject(ctx, b.bucket, b.prefix+name, minio.RemoveObjectOptions{})
	if err != nil && !notFound(err) {
		return fmt.Errorf("delete %s/%s%s: %w", b.bucket, b.prefix, name, err)
	}
	return nil
}

func (b *s3Backend) Sync(ctx context.Context) error { return nil }
