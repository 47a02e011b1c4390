import fsspec


def test_s3_endpoint_roundtrip(s3_endpoint):
    fs = fsspec.filesystem("s3")
    fs.pipe("test-bucket/fixture-check/hello.txt", b"hello")
    assert fs.cat("test-bucket/fixture-check/hello.txt") == b"hello"
