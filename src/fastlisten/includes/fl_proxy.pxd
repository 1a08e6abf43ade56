# The PROXY protocol parser and reader in csrc/fl_proxy.c (csrc/fl_proxy.h
# has their contracts).
from libc.stdint cimport uint32_t

cdef extern from "fl_proxy.h" nogil:
    enum:
        FL_PROXY_V1
        FL_PROXY_V2
        FL_PROXY_V1_MAX
        FL_PROXY_AF_UNSPEC
        FL_PROXY_AF_INET
        FL_PROXY_AF_INET6
        FL_PROXY_AF_UNIX

    ctypedef struct fl_proxy_hdr:
        int version
        int command
        int family
        int transport
        size_t length
        int has_addresses
        unsigned char src[16]
        unsigned char dst[16]
        unsigned int src_port
        unsigned int dst_port
        size_t src_unix
        size_t dst_unix
        size_t tlv_start
        size_t tlv_end

    long fl_proxy_parse(const unsigned char *buf, size_t len, int versions, size_t max_v2,
                        fl_proxy_hdr *out, size_t *need)
    long fl_proxy_take(int fd, unsigned char *buf, size_t cap, size_t *have)
    int fl_proxy_wait(int fd, int timeout_ms)
    uint32_t fl_crc32c(uint32_t crc, const unsigned char *buf, size_t len)
