/* fastlisten: PROXY protocol v1/v2 parsing and reading (see fl_proxy.h). */
#include "fl_proxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

static const unsigned char v2_signature[12] = {
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

/* Reflected table of the Castagnoli polynomial 0x1EDC6F41 (0x82F63B78). */
static uint32_t crc_table[256];
static volatile int crc_ready;

static void crc_init(void)
{
    uint32_t i, j, c;
    for (i = 0; i < 256; i++) {
        c = i;
        for (j = 0; j < 8; j++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
    crc_ready = 1;   /* racing initialisers write the same values */
}

uint32_t fl_crc32c(uint32_t crc, const unsigned char *buf, size_t len)
{
    size_t i;
    if (!crc_ready)
        crc_init();
    crc = ~crc;
    for (i = 0; i < len; i++)
        crc = crc_table[(crc ^ buf[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

static unsigned be16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

static uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* A v1 address field: only the characters an address can have (so that a
 * NUL cannot cut it short for inet_pton), then inet_pton itself, which
 * refuses leading zeros in IPv4. */
static int v1_address(const unsigned char *f, size_t n, int family, unsigned char *out)
{
    char tmp[64];
    size_t i;
    if (n == 0 || n > 45)
        return -1;
    for (i = 0; i < n; i++) {
        unsigned char c = f[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
              || c == '.' || c == ':'))
            return -1;
        tmp[i] = (char)c;
    }
    tmp[n] = '\0';
    return inet_pton(family == FL_PROXY_AF_INET ? AF_INET : AF_INET6, tmp, out) == 1 ? 0 : -1;
}

/* A v1 port: 0..65535 in decimal, no leading zero. */
static int v1_port(const unsigned char *f, size_t n, unsigned int *out)
{
    size_t i;
    unsigned long v = 0;
    if (n == 0 || n > 5 || (n > 1 && f[0] == '0'))
        return -1;
    for (i = 0; i < n; i++) {
        if (f[i] < '0' || f[i] > '9')
            return -1;
        v = v * 10 + (f[i] - '0');
    }
    if (v > 65535)
        return -1;
    *out = (unsigned int)v;
    return 0;
}

static long parse_v1(const unsigned char *buf, size_t len, fl_proxy_hdr *out)
{
    size_t lim = len < FL_PROXY_V1_MAX ? len : FL_PROXY_V1_MAX, i, k, flen[4];
    const unsigned char *p, *e, *field[4];
    int family;

    for (i = 1; i < lim; i++)
        if (buf[i - 1] == '\r' && buf[i] == '\n')
            break;
    if (i >= lim)
        return len >= FL_PROXY_V1_MAX ? FL_PROXY_E_TOO_LONG : 0;
    /* the line is buf[6:i-1]; the header is i + 1 bytes */
    p = buf + 6;
    e = buf + i - 1;
    memset(out, 0, sizeof(*out));
    out->version = 1;
    out->command = FL_PROXY_PROXY;
    out->length = i + 1;
    if (e - p >= 7 && memcmp(p, "UNKNOWN", 7) == 0 && (e - p == 7 || p[7] == ' ')) {
        /* the receiver ignores the rest of the line */
        out->family = FL_PROXY_AF_UNSPEC;
        out->transport = FL_PROXY_T_UNSPEC;
        return (long)out->length;
    }
    if (e - p >= 4 && memcmp(p, "TCP4", 4) == 0)
        family = FL_PROXY_AF_INET;
    else if (e - p >= 4 && memcmp(p, "TCP6", 4) == 0)
        family = FL_PROXY_AF_INET6;
    else
        return FL_PROXY_E_FAMILY;
    p += 4;
    if (p == e)
        return FL_PROXY_E_SYNTAX;
    if (*p != ' ')
        return FL_PROXY_E_FAMILY;
    p++;
    for (k = 0; k < 4; k++) {
        field[k] = p;
        while (p < e && *p != ' ')
            p++;
        flen[k] = (size_t)(p - field[k]);
        if (flen[k] == 0)
            return FL_PROXY_E_SYNTAX;
        if (k < 3) {
            if (p == e)
                return FL_PROXY_E_SYNTAX;
            p++;
        }
    }
    if (p != e)
        return FL_PROXY_E_SYNTAX;
    if (v1_address(field[0], flen[0], family, out->src) < 0
        || v1_address(field[1], flen[1], family, out->dst) < 0)
        return FL_PROXY_E_ADDRESS;
    if (v1_port(field[2], flen[2], &out->src_port) < 0
        || v1_port(field[3], flen[3], &out->dst_port) < 0)
        return FL_PROXY_E_PORT;
    out->family = family;
    out->transport = FL_PROXY_T_STREAM;
    out->has_addresses = 1;
    return (long)out->length;
}

static long parse_v2(const unsigned char *buf, size_t len, size_t max_v2,
                     fl_proxy_hdr *out, size_t *need)
{
    unsigned cmd, fam, tr;
    size_t total, addr, off, tlen, crc_at = 0;
    static const unsigned char zeros[4] = {0, 0, 0, 0};
    uint32_t crc;

    if (need)
        *need = FL_PROXY_V2_FIXED;
    if (len < 13)
        return 0;
    if ((buf[12] >> 4) != 2)
        return FL_PROXY_E_VERSION;
    cmd = buf[12] & 0x0F;
    if (cmd > FL_PROXY_PROXY)
        return FL_PROXY_E_COMMAND;
    if (len < 14)
        return 0;
    fam = buf[13] >> 4;
    tr = buf[13] & 0x0F;
    /* the spec's seven combinations; anything else is refused */
    if (!(buf[13] == 0x00 || (fam >= 1 && fam <= 3 && tr >= 1 && tr <= 2)))
        return FL_PROXY_E_FAMILY;
    if (len < FL_PROXY_V2_FIXED)
        return 0;
    total = FL_PROXY_V2_FIXED + be16(buf + 14);
    if (total > max_v2)
        return FL_PROXY_E_TOO_LONG;
    if (len < total) {
        if (need)
            *need = total;
        return 0;
    }
    addr = fam == FL_PROXY_AF_INET ? 12 : fam == FL_PROXY_AF_INET6 ? 36
         : fam == FL_PROXY_AF_UNIX ? 216 : 0;
    memset(out, 0, sizeof(*out));
    out->version = 2;
    out->command = (int)cmd;
    out->family = (int)fam;
    out->transport = (int)tr;
    out->length = total;
    out->tlv_start = out->tlv_end = total;
    if (total - FL_PROXY_V2_FIXED < addr) {
        if (cmd == FL_PROXY_PROXY)
            return FL_PROXY_E_LENGTH;
        return (long)total;
    }
    if (cmd != FL_PROXY_PROXY || fam == FL_PROXY_AF_UNSPEC)
        return (long)total;     /* LOCAL, UNSPEC: the block is skipped, unread */
    {
        const unsigned char *a = buf + FL_PROXY_V2_FIXED;
        out->has_addresses = 1;
        if (fam == FL_PROXY_AF_INET) {
            memcpy(out->src, a, 4);
            memcpy(out->dst, a + 4, 4);
            out->src_port = be16(a + 8);
            out->dst_port = be16(a + 10);
        } else if (fam == FL_PROXY_AF_INET6) {
            memcpy(out->src, a, 16);
            memcpy(out->dst, a + 16, 16);
            out->src_port = be16(a + 32);
            out->dst_port = be16(a + 34);
        } else {
            out->src_unix = FL_PROXY_V2_FIXED;
            out->dst_unix = FL_PROXY_V2_FIXED + 108;
        }
    }
    off = out->tlv_start = FL_PROXY_V2_FIXED + addr;
    while (off < total) {
        if (total - off < 3)
            return FL_PROXY_E_TLV;
        tlen = be16(buf + off + 1);
        if (tlen > total - off - 3)
            return FL_PROXY_E_TLV;
        if (buf[off] == 0x03) {          /* CRC32C: once, 4 bytes */
            if (tlen != 4 || crc_at)
                return FL_PROXY_E_TLV;
            crc_at = off + 3;
        } else if (buf[off] == 0x05 && tlen > 128) {   /* UNIQUE_ID: at most 128 */
            return FL_PROXY_E_TLV;
        }
        off += 3 + tlen;
    }
    if (crc_at) {
        crc = fl_crc32c(0, buf, crc_at);
        crc = fl_crc32c(crc, zeros, 4);
        crc = fl_crc32c(crc, buf + crc_at + 4, total - crc_at - 4);
        if (crc != be32(buf + crc_at))
            return FL_PROXY_E_CRC32C;
    }
    return (long)total;
}

long fl_proxy_parse(const unsigned char *buf, size_t len, int versions, size_t max_v2,
                    fl_proxy_hdr *out, size_t *need)
{
    size_t n;
    if (need)
        *need = 0;
    if (len == 0)
        return 0;
    if (buf[0] == 'P') {
        n = len < 6 ? len : 6;
        if (memcmp(buf, "PROXY ", n) != 0)
            return FL_PROXY_E_SIGNATURE;
        if (!(versions & FL_PROXY_V1))
            return FL_PROXY_E_NOT_ACCEPTED;
        return parse_v1(buf, len, out);
    }
    if (buf[0] == 0x0D) {
        n = len < 12 ? len : 12;
        if (memcmp(buf, v2_signature, n) != 0)
            return FL_PROXY_E_SIGNATURE;
        if (!(versions & FL_PROXY_V2))
            return FL_PROXY_E_NOT_ACCEPTED;
        return parse_v2(buf, len, max_v2, out, need);
    }
    return FL_PROXY_E_SIGNATURE;
}

long fl_proxy_take(int fd, unsigned char *buf, size_t cap, size_t *have)
{
    size_t h = *have, i, k, total;
    ssize_t n, r;

    if (h >= cap) {
        errno = ENOBUFS;
        return -1;
    }
    do {
        n = recv(fd, buf + h, cap - h, MSG_PEEK | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        return n;
    if (buf[0] == 'P') {
        /* v1: up to and including the first CRLF, at most 107 bytes */
        k = (size_t)n;
        for (i = h > 0 ? h : 1; i < h + (size_t)n; i++) {
            if (buf[i - 1] == '\r' && buf[i] == '\n') {
                k = i + 1 - h;
                break;
            }
        }
        if (h + k > FL_PROXY_V1_MAX)
            k = h < FL_PROXY_V1_MAX ? FL_PROXY_V1_MAX - h : 1;
    } else if (buf[0] == 0x0D) {
        /* v2: the 16 fixed bytes, then as many as their length says */
        if (h + (size_t)n < FL_PROXY_V2_FIXED) {
            k = (size_t)n;
        } else {
            total = FL_PROXY_V2_FIXED + be16(buf + 14);
            k = total > h ? total - h : 1;
            if (k > (size_t)n)
                k = (size_t)n;
        }
    } else {
        k = 1;      /* no header starts so: take one byte for the parser to refuse */
    }
    do {
        r = recv(fd, buf + h, k, MSG_DONTWAIT);
    } while (r < 0 && errno == EINTR);
    if (r > 0)
        *have = h + (size_t)r;
    return r;
}

int fl_proxy_wait(int fd, int timeout_ms)
{
    struct pollfd p;
    int r;
    p.fd = fd;
    p.events = POLLIN;
    p.revents = 0;
    r = poll(&p, 1, timeout_ms);
    if (r > 0 && (p.revents & POLLNVAL)) {
        errno = EBADF;
        return -1;
    }
    return r > 0 ? 1 : r;
}
