/* fastlisten: the PROXY protocol (HAProxy's doc/proxy-protocol.txt), v1 and v2.
 *
 * fl_proxy_parse() decides whether the bytes at the start of a connection
 * are a complete, valid header, a valid prefix of one (more bytes needed)
 * or an invalid one; fl_proxy_take() reads from a socket only bytes that
 * belong to the header, never beyond it.  Neither touches a Python object,
 * both run without the GIL.  The pure-Python twin is fastlisten._corepy
 * (proxy_parse, proxy_read); the error codes are the table in
 * fastlisten/proxy.py.
 */
#ifndef FL_PROXY_H
#define FL_PROXY_H

#include <stddef.h>
#include <stdint.h>

/* Which versions a receiver accepts (a bit set). */
#define FL_PROXY_V1 1
#define FL_PROXY_V2 2

/* A v1 line is at most this long, CRLF included. */
#define FL_PROXY_V1_MAX 107
/* The fixed part of a v2 header. */
#define FL_PROXY_V2_FIXED 16
/* The largest v2 header there can be (16 + a 16-bit length). */
#define FL_PROXY_V2_LIMIT (16 + 65535)

/* fl_proxy_parse's results below zero (fastlisten/proxy.py has the same table). */
enum {
    FL_PROXY_E_SIGNATURE = -1,    /* neither "PROXY " nor the v2 signature */
    FL_PROXY_E_VERSION = -2,      /* v2 version nibble is not 2 */
    FL_PROXY_E_COMMAND = -3,      /* v2 command is neither LOCAL nor PROXY */
    FL_PROXY_E_FAMILY = -4,       /* unknown family/transport (v2) or protocol (v1) */
    FL_PROXY_E_ADDRESS = -5,      /* v1 address not valid for its family */
    FL_PROXY_E_PORT = -6,         /* v1 port not 0..65535 without leading zeros */
    FL_PROXY_E_TOO_LONG = -7,     /* v1 without CRLF in 107 bytes; v2 over the maximum */
    FL_PROXY_E_LENGTH = -8,       /* v2 length shorter than its address block */
    FL_PROXY_E_TLV = -9,          /* a TLV overruns the header or has a bad size */
    FL_PROXY_E_CRC32C = -10,      /* the CRC32C TLV does not match */
    FL_PROXY_E_NOT_ACCEPTED = -11,/* a version the receiver was not configured for */
    FL_PROXY_E_SYNTAX = -12,      /* v1 line not exactly as the spec writes it */
};

enum { FL_PROXY_LOCAL = 0, FL_PROXY_PROXY = 1 };
/* Families and transports as the v2 header numbers them. */
enum { FL_PROXY_AF_UNSPEC = 0, FL_PROXY_AF_INET = 1, FL_PROXY_AF_INET6 = 2,
       FL_PROXY_AF_UNIX = 3 };
enum { FL_PROXY_T_UNSPEC = 0, FL_PROXY_T_STREAM = 1, FL_PROXY_T_DGRAM = 2 };

typedef struct {
    int version;              /* 1 or 2 */
    int command;              /* FL_PROXY_LOCAL or FL_PROXY_PROXY */
    int family;               /* FL_PROXY_AF_* (addresses below only for INET/INET6/UNIX) */
    int transport;            /* FL_PROXY_T_* */
    size_t length;            /* bytes of the header, CRLF or TLVs included */
    int has_addresses;        /* 1: src/dst below are the real endpoints */
    unsigned char src[16];    /* IPv4 (4 bytes) or IPv6 (16), network order */
    unsigned char dst[16];
    unsigned int src_port;
    unsigned int dst_port;
    size_t src_unix;          /* AF_UNIX: offsets of the two 108-byte paths */
    size_t dst_unix;
    size_t tlv_start;         /* v2: the TLVs are buf[tlv_start:tlv_end], checked */
    size_t tlv_end;
} fl_proxy_hdr;

/* Parse buf[0:len].  Returns the header's length (> 0) and fills *out
 * when buf starts with a complete valid header; 0 when buf is a valid
 * prefix of one (read more: *need, if not NULL, gets how many bytes in
 * total are known to be needed, 0 for "up to CRLF"); an FL_PROXY_E_*
 * code (< 0) when it is not and never can be.  max_v2 caps a v2 header's
 * total length (16 + its length field). */
long fl_proxy_parse(const unsigned char *buf, size_t len, int versions, size_t max_v2,
                    fl_proxy_hdr *out, size_t *need);

/* One step of reading a header from a connected socket: look at what has
 * arrived (MSG_PEEK, MSG_DONTWAIT) and take from it only bytes that belong
 * to the header (for v1, nothing past the first CRLF; for v2, nothing past
 * 16 + its length), appending them to buf (which holds *have bytes, at most
 * cap).  Returns the bytes taken (> 0), 0 at end of file, -1 with errno set
 * (EAGAIN: nothing has arrived; wait for POLLIN).  A first byte that starts
 * no header is taken alone, for fl_proxy_parse to reject. */
long fl_proxy_take(int fd, unsigned char *buf, size_t cap, size_t *have);

/* Wait up to timeout_ms (-1: for ever) for fd to be readable.  1 ready,
 * 0 timed out, -1 with errno set (EINTR: a signal arrived). */
int fl_proxy_wait(int fd, int timeout_ms);

/* CRC32C (Castagnoli, RFC 4960 appendix B) of buf, continuing from crc
 * (start with 0). */
uint32_t fl_crc32c(uint32_t crc, const unsigned char *buf, size_t len);

#endif
