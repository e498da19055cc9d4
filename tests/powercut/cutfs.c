/* cutfs: a FUSE file system that forgets everything not synced, on command.
 *
 * Design notes
 * ------------
 * What it is for: power cuts of a real server in tests.  A program on a real file system
 * after a power loss finds only what it made durable: file data covered by an
 * fsync/fdatasync of that file, and names (create, rename, unlink, mkdir) covered by an
 * fsync of their directory.  cutfs keeps that distinction and drops the rest on command,
 * in the manner of LazyFS, but with a smaller model of its own.
 *
 * Layout of the backing directory B:
 *   B/vol/    the volatile view: every operation is applied here at once and served from
 *             here (real files, so sparse files, fallocate and SEEK_DATA/SEEK_HOLE simply
 *             pass through);
 *   B/store/  durable inodes, one file per inode id: the file data as of its last fsync;
 *   B/tree/   the durable names: directories, and hard links into B/store/ for files.
 * Each regular file of vol/ has an inode id (a table keyed by its st_ino) and a bitmap of
 * its 512-byte sectors written since its last sync.
 *
 *   fsync(file)      copies the dirty sectors from vol/ to store/ID and sets the size
 *                    (fdatasync does the same: it also covers the size);
 *   fsync(directory) makes tree/DIR's entries those of vol/DIR: links new or renamed files
 *                    (a file never synced appears empty), removes vanished ones, creates
 *                    new subdirectories (empty: their entries need their own fsync);
 *   "cut" (a write to the control file /.cutfs) freezes the durable state at once: from
 *                    then on every operation but reads fails with EIO, so the processes
 *                    killed next cannot make anything more durable.  "tear SEED" first
 *                    writes a random half (seeded) of the dirty sectors that lie within
 *                    the durable size of their file -- what the kernel's writeback may
 *                    have put on the disk before the power failed; sizes and names are
 *                    never torn (as ext4 with data=ordered);
 *   "sync" makes everything durable (writeback after a long quiet time);
 *   "count FILE" writes to FILE (outside the mount) each file's bytes written or
 *                    fallocated since the mount: what a copy sent to a target.
 * After a cut the test unmounts; the next start rebuilds vol/ from tree/ (dropping every
 * store file no name refers to) and serves the durable state.
 *
 * Deliberately simple: directories are known by their path (a renamed directory is not
 * modelled); no hard links, symlinks or xattrs (ENOSYS); sockets and fifos exist in vol/
 * only; a directory fsync creates its own durable directory (and parents) if missing,
 * which is kinder than a real file system; mtimes and modes are not made durable.
 * Every operation but read holds one lock, so a cut falls between operations.
 *
 * Why C against libfuse3 rather than Python: the server under test and its NBD clients run
 * on this layer's data path, on two shared cores.  A Python FUSE binding adds a GIL-bound
 * interpreter round per request and a PyPI dependency; this file builds with cc in a
 * second from Debian's libfuse3-dev and the copies it makes are plain pread/pwrite.
 *
 * usage: cutfs BACKING_DIR MOUNTPOINT   (stays in the foreground; fusermount3 -u ends it)
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define SECTOR 512
#define CTL "/.cutfs"
#define CTL_FH UINT64_MAX
#define TMP_NAME ".cutfs-tmp"
#define NBUCKETS 4096

static char vol_root[PATH_MAX], tree_root[PATH_MAX], store_root[PATH_MAX];
static pthread_mutex_t big = PTHREAD_MUTEX_INITIALIZER;
static int dead;
static unsigned long next_id = 1;

struct node {
    ino_t ino;
    unsigned long id;
    uint64_t *bits; /* dirty sectors */
    size_t nwords;
    off_t trunc_low; /* lowest size truncated to since the last sync, or -1 */
    uint64_t written; /* bytes written or fallocated since the mount (for "count") */
    struct node *next;
};
static struct node *buckets[NBUCKETS];

static struct node *node_get(ino_t ino) {
    for (struct node *n = buckets[ino % NBUCKETS]; n; n = n->next)
        if (n->ino == ino) return n;
    return NULL;
}

/* A new inode (create, or found at start): a new id unless given, replacing a dead one
 * whose st_ino was reused. */
static struct node *node_new(ino_t ino, unsigned long id) {
    struct node *n = node_get(ino);
    if (!n) {
        n = calloc(1, sizeof *n);
        if (!n) abort();
        n->ino = ino;
        n->next = buckets[ino % NBUCKETS];
        buckets[ino % NBUCKETS] = n;
    }
    free(n->bits);
    n->bits = NULL;
    n->nwords = 0;
    n->trunc_low = -1;
    n->written = 0;
    n->id = id ? id : next_id++;
    return n;
}

static struct node *node_of_fd(int fd) {
    struct stat st;
    if (fstat(fd, &st) < 0) return NULL;
    struct node *n = node_get(st.st_ino);
    return n ? n : node_new(st.st_ino, 0);
}

static void mark(struct node *n, off_t off, off_t len) {
    if (len <= 0) return;
    uint64_t first = off / SECTOR, last = (off + len - 1) / SECTOR;
    size_t need = last / 64 + 1;
    if (need > n->nwords) {
        size_t grow = need > 2 * n->nwords ? need : 2 * n->nwords;
        n->bits = realloc(n->bits, grow * sizeof(uint64_t));
        if (!n->bits) abort();
        memset(n->bits + n->nwords, 0, (grow - n->nwords) * sizeof(uint64_t));
        n->nwords = grow;
    }
    for (uint64_t s = first; s <= last; s++) {
        if (s % 64 == 0 && s + 63 <= last) {
            n->bits[s / 64] = ~(uint64_t)0;
            s += 63;
        } else {
            n->bits[s / 64] |= (uint64_t)1 << (s % 64);
        }
    }
}

static int is_dirty(const struct node *n, uint64_t s) {
    return s / 64 < n->nwords && (n->bits[s / 64] >> (s % 64)) & 1;
}

static void vpath(char *out, const char *path) { snprintf(out, PATH_MAX, "%s%s", vol_root, path); }
static void spath(char *out, unsigned long id) { snprintf(out, PATH_MAX, "%s/%lu", store_root, id); }

static int all_zero(const char *buf, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (buf[i]) return 0;
    return 1;
}

/* Copy [off, off+len) of the volatile file to the store file (holes for zeroes). */
static int copy_range(int vfd, int sfd, off_t off, off_t len) {
    static char buf[1 << 20];
    while (len > 0) {
        size_t want = len < (off_t)sizeof buf ? (size_t)len : sizeof buf;
        ssize_t got = pread(vfd, buf, want, off);
        if (got < 0) return -errno;
        if (got == 0) return 0; /* past the end: the final ftruncate settles it */
        if (all_zero(buf, got) &&
            fallocate(sfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, got) == 0) {
            struct stat st;
            if (fstat(sfd, &st) == 0 && st.st_size < off + got && ftruncate(sfd, off + got) < 0)
                return -errno;
        } else if (pwrite(sfd, buf, got, off) != got) {
            return -EIO;
        }
        off += got;
        len -= got;
    }
    return 0;
}

static int store_open(unsigned long id) {
    char sp[PATH_MAX];
    spath(sp, id);
    return open(sp, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
}

/* fsync of a file: its dirty sectors and its size become durable. */
static int sync_node(struct node *n, int vfd) {
    struct stat vst;
    if (fstat(vfd, &vst) < 0) return -errno;
    int sfd = store_open(n->id);
    if (sfd < 0) return -errno;
    int res = 0;
    if (n->trunc_low >= 0 && ftruncate(sfd, n->trunc_low) < 0) res = -errno;
    uint64_t nsect = n->nwords * 64;
    for (uint64_t s = 0; res == 0 && s < nsect;) {
        if (!n->bits[s / 64]) {
            s = (s / 64 + 1) * 64;
            continue;
        }
        if (!is_dirty(n, s)) {
            s++;
            continue;
        }
        uint64_t e = s;
        while (e < nsect && is_dirty(n, e)) e++;
        off_t off = (off_t)s * SECTOR, end = (off_t)e * SECTOR;
        if (off < vst.st_size) res = copy_range(vfd, sfd, off, (end < vst.st_size ? end : vst.st_size) - off);
        s = e;
    }
    if (res == 0 && (ftruncate(sfd, vst.st_size) < 0 || fchmod(sfd, vst.st_mode & 07777) < 0)) res = -errno;
    close(sfd);
    if (res == 0) {
        memset(n->bits, 0, n->nwords * sizeof(uint64_t));
        n->trunc_low = -1;
    }
    return res;
}

static int rm_tree(const char *path);

/* fsync of a directory: its durable entries become the volatile ones. */
static int sync_dir(const char *path) {
    char vd[PATH_MAX], td[PATH_MAX], a[PATH_MAX], b[PATH_MAX];
    vpath(vd, path);
    snprintf(td, PATH_MAX, "%s%s", tree_root, path);
    /* create the durable directory (and parents) if missing */
    for (char *p = td + strlen(tree_root) + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(td, 0755);
            *p = '/';
        }
    mkdir(td, 0755);
    DIR *d = opendir(td);
    if (!d) return -errno;
    struct dirent *e;
    while ((e = readdir(d))) { /* names gone from the volatile directory */
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        struct stat vst, tst;
        snprintf(a, PATH_MAX, "%s/%s", vd, e->d_name);
        snprintf(b, PATH_MAX, "%s/%s", td, e->d_name);
        if (lstat(b, &tst) < 0) continue;
        if (lstat(a, &vst) < 0 || (vst.st_mode & S_IFMT) != (tst.st_mode & S_IFMT) ||
            !(S_ISREG(vst.st_mode) || S_ISDIR(vst.st_mode)))
            rm_tree(b);
    }
    closedir(d);
    d = opendir(vd);
    if (!d) return -errno;
    int res = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        struct stat vst, tst, sst;
        snprintf(a, PATH_MAX, "%s/%s", vd, e->d_name);
        snprintf(b, PATH_MAX, "%s/%s", td, e->d_name);
        if (lstat(a, &vst) < 0) continue;
        if (S_ISDIR(vst.st_mode)) {
            mkdir(b, 0755);
        } else if (S_ISREG(vst.st_mode)) {
            struct node *n = node_get(vst.st_ino);
            if (!n) n = node_new(vst.st_ino, 0);
            int sfd = store_open(n->id); /* a file never synced is linked empty */
            if (sfd < 0 || fstat(sfd, &sst) < 0) {
                res = -EIO;
                if (sfd >= 0) close(sfd);
                continue;
            }
            close(sfd);
            if (lstat(b, &tst) == 0 && tst.st_ino == sst.st_ino) continue;
            char sp[PATH_MAX], tmp[PATH_MAX];
            spath(sp, n->id);
            snprintf(tmp, PATH_MAX, "%s/%s", td, TMP_NAME);
            unlink(tmp);
            if (link(sp, tmp) < 0 || rename(tmp, b) < 0) res = -errno;
        }
    }
    closedir(d);
    return res;
}

static int rm_tree(const char *path) {
    struct stat st;
    if (lstat(path, &st) < 0) return -errno;
    if (!S_ISDIR(st.st_mode)) return unlink(path) < 0 ? -errno : 0;
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        char sub[PATH_MAX];
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(sub, PATH_MAX, "%s/%s", path, e->d_name);
            rm_tree(sub);
        }
        closedir(d);
    }
    return rmdir(path) < 0 ? -errno : 0;
}

/* "sync": every file and every directory of vol/ made durable (depth first). */
static int sync_all(const char *path) {
    char vd[PATH_MAX], sub[PATH_MAX];
    vpath(vd, path);
    DIR *d = opendir(vd);
    if (!d) return -errno;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        struct stat st;
        snprintf(sub, PATH_MAX, "%s/%s", strcmp(path, "/") ? path : "", e->d_name);
        char full[PATH_MAX];
        vpath(full, sub);
        if (lstat(full, &st) < 0) continue;
        if (S_ISDIR(st.st_mode)) {
            sync_all(sub);
        } else if (S_ISREG(st.st_mode)) {
            int fd = open(full, O_RDONLY | O_CLOEXEC);
            if (fd >= 0) {
                struct node *n = node_of_fd(fd);
                if (n) sync_node(n, fd);
                close(fd);
            }
        }
    }
    closedir(d);
    return sync_dir(path);
}

/* "tear SEED": a random half of the dirty sectors inside each file's durable size (the
 * files reached by a name in vol/; x is the seeded generator's state). */
static void tear(const char *path, uint64_t *x) {
    char vd[PATH_MAX], sub[PATH_MAX], full[PATH_MAX], sp[PATH_MAX], buf[SECTOR];
    vpath(vd, path);
    DIR *d = opendir(vd);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        struct stat st, sst;
        snprintf(sub, PATH_MAX, "%s/%s", strcmp(path, "/") ? path : "", e->d_name);
        vpath(full, sub);
        if (lstat(full, &st) < 0) continue;
        if (S_ISDIR(st.st_mode)) {
            tear(sub, x);
            continue;
        }
        struct node *n = S_ISREG(st.st_mode) ? node_get(st.st_ino) : NULL;
        if (!n) continue;
        spath(sp, n->id);
        int sfd = open(sp, O_WRONLY | O_CLOEXEC); /* never synced: nothing of it can be seen */
        int vfd = open(full, O_RDONLY | O_CLOEXEC);
        if (sfd >= 0 && vfd >= 0 && fstat(sfd, &sst) == 0)
            for (uint64_t s = 0; s < n->nwords * 64 && (off_t)(s + 1) * SECTOR <= sst.st_size; s++) {
                if (!is_dirty(n, s)) continue;
                *x ^= *x << 13, *x ^= *x >> 7, *x ^= *x << 17;
                if ((*x & 1) && pread(vfd, buf, SECTOR, (off_t)s * SECTOR) == SECTOR)
                    (void)!pwrite(sfd, buf, SECTOR, (off_t)s * SECTOR);
            }
        if (sfd >= 0) close(sfd);
        if (vfd >= 0) close(vfd);
    }
    closedir(d);
}

/* "count FILE": one line "PATH BYTES" per file of vol/ (bytes written or fallocated since
 * the mount), written to FILE (a path outside the mount). */
static void count(const char *path, FILE *out) {
    char vd[PATH_MAX], sub[PATH_MAX], full[PATH_MAX];
    vpath(vd, path);
    DIR *d = opendir(vd);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        struct stat st;
        snprintf(sub, PATH_MAX, "%s/%s", strcmp(path, "/") ? path : "", e->d_name);
        vpath(full, sub);
        if (lstat(full, &st) < 0) continue;
        if (S_ISDIR(st.st_mode)) {
            count(sub, out);
        } else if (S_ISREG(st.st_mode)) {
            struct node *n = node_get(st.st_ino);
            fprintf(out, "%s %llu\n", sub, n ? (unsigned long long)n->written : 0ULL);
        }
    }
    closedir(d);
}

/* ---- FUSE operations ---- */

#define LOCK()                              \
    pthread_mutex_lock(&big);               \
    if (dead) {                             \
        pthread_mutex_unlock(&big);         \
        return -EIO;                        \
    }
#define UNLOCK_RET(r)                       \
    do {                                    \
        int r_ = (r);                       \
        pthread_mutex_unlock(&big);         \
        return r_;                          \
    } while (0)

static void *cf_init(struct fuse_conn_info *conn, struct fuse_config *cfg) {
    /* every write(2) reaches us before it returns: no kernel write-back cache in between */
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
    cfg->use_ino = 1;
    cfg->hard_remove = 1;
    cfg->nullpath_ok = 1;
    return NULL;
}

static int cf_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    if (path && !strcmp(path, CTL)) {
        memset(st, 0, sizeof *st);
        st->st_mode = S_IFREG | 0600;
        st->st_nlink = 1;
        return 0;
    }
    if (fi && fi->fh != CTL_FH) return fstat(fi->fh, st) < 0 ? -errno : 0;
    char p[PATH_MAX];
    vpath(p, path);
    return lstat(p, st) < 0 ? -errno : 0;
}

static int cf_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off, struct fuse_file_info *fi,
                      enum fuse_readdir_flags flags) {
    (void)off, (void)flags;
    char p[PATH_MAX];
    vpath(p, path ? path : (const char *)(uintptr_t)fi->fh);
    DIR *d = opendir(p);
    if (!d) return -errno;
    struct dirent *e;
    while ((e = readdir(d)))
        if (fill(buf, e->d_name, NULL, 0, 0)) break;
    closedir(d);
    return 0;
}

static int cf_mkdir(const char *path, mode_t mode) {
    char p[PATH_MAX];
    vpath(p, path);
    LOCK();
    UNLOCK_RET(mkdir(p, mode) < 0 ? -errno : 0);
}

static int cf_rmdir(const char *path) {
    char p[PATH_MAX];
    vpath(p, path);
    LOCK();
    UNLOCK_RET(rmdir(p) < 0 ? -errno : 0);
}

static int cf_unlink(const char *path) {
    char p[PATH_MAX];
    vpath(p, path);
    LOCK();
    UNLOCK_RET(unlink(p) < 0 ? -errno : 0);
}

static int cf_rename(const char *from, const char *to, unsigned int flags) {
    char a[PATH_MAX], b[PATH_MAX];
    vpath(a, from);
    vpath(b, to);
    LOCK();
    UNLOCK_RET(renameat2(AT_FDCWD, a, AT_FDCWD, b, flags) < 0 ? -errno : 0);
}

static int cf_mknod(const char *path, mode_t mode, dev_t rdev) {
    char p[PATH_MAX];
    vpath(p, path);
    LOCK();
    if (mknod(p, mode, rdev) < 0) UNLOCK_RET(-errno);
    struct stat st;
    if (S_ISREG(mode) && lstat(p, &st) == 0) node_new(st.st_ino, 0);
    UNLOCK_RET(0);
}

static int open_flags(int flags) {
    return (flags & ~(O_ACCMODE | O_SYNC | O_DSYNC | O_DIRECT | O_CREAT | O_EXCL)) | O_RDWR | O_CLOEXEC;
}

static int cf_create(const char *path, mode_t mode, struct fuse_file_info *fi) {
    char p[PATH_MAX];
    vpath(p, path);
    LOCK();
    int fd = open(p, open_flags(fi->flags) | O_CREAT | (fi->flags & O_EXCL), mode);
    if (fd < 0) UNLOCK_RET(-errno);
    struct stat st;
    fstat(fd, &st);
    node_new(st.st_ino, 0);
    fi->fh = fd;
    UNLOCK_RET(0);
}

static int cf_open(const char *path, struct fuse_file_info *fi) {
    if (!strcmp(path, CTL)) {
        fi->fh = CTL_FH;
        fi->direct_io = 1;
        return 0;
    }
    char p[PATH_MAX];
    vpath(p, path);
    LOCK();
    struct stat before;
    int had = lstat(p, &before) == 0;
    int fd = open(p, open_flags(fi->flags), 0);
    if (fd < 0) UNLOCK_RET(-errno);
    if (fi->flags & O_TRUNC && had) {
        struct node *n = node_of_fd(fd);
        if (n) {
            n->trunc_low = 0;
            mark(n, 0, 0);
        }
    }
    fi->fh = fd;
    UNLOCK_RET(0);
}

static int cf_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)path;
    if (fi->fh == CTL_FH) return 0;
    ssize_t n = pread(fi->fh, buf, size, off);
    return n < 0 ? -errno : (int)n;
}

static int control(const char *buf, size_t size) {
    char cmd[PATH_MAX] = {0};
    memcpy(cmd, buf, size < sizeof cmd - 1 ? size : sizeof cmd - 1);
    unsigned long long seed;
    pthread_mutex_lock(&big);
    int res = 0;
    if (!strncmp(cmd, "cut", 3)) {
        dead = 1;
    } else if (sscanf(cmd, "tear %llu", &seed) == 1) {
        uint64_t x = seed * 2654435761u + 88172645463325252ull;
        if (!dead) tear("/", &x);
        dead = 1;
    } else if (!strncmp(cmd, "count ", 6)) {
        char *nl = strchr(cmd, '\n');
        if (nl) *nl = 0;
        FILE *out = fopen(cmd + 6, "w");
        if (out) {
            count("/", out);
            fclose(out);
        } else {
            res = -errno;
        }
    } else if (!strncmp(cmd, "sync", 4)) {
        res = dead ? -EIO : sync_all("/");
    } else {
        res = -EINVAL;
    }
    pthread_mutex_unlock(&big);
    return res < 0 ? res : (int)size;
}

static int cf_write(const char *path, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)path;
    if (fi->fh == CTL_FH) return control(buf, size);
    LOCK();
    ssize_t n = pwrite(fi->fh, buf, size, off);
    if (n < 0) UNLOCK_RET(-errno);
    struct node *nd = node_of_fd(fi->fh);
    if (!nd) UNLOCK_RET(-EIO);
    if (fi->flags & O_APPEND) {
        struct stat st;
        fstat(fi->fh, &st);
        off = st.st_size - n;
    }
    mark(nd, off, n);
    nd->written += n;
    if (fi->flags & (O_SYNC | O_DSYNC)) {
        int r = sync_node(nd, fi->fh);
        if (r < 0) UNLOCK_RET(r);
    }
    UNLOCK_RET((int)n);
}

static int cf_truncate(const char *path, off_t size, struct fuse_file_info *fi) {
    if (path && !strcmp(path, CTL)) return 0;
    LOCK();
    int fd = fi ? (int)fi->fh : -1, own = 0;
    if (fd < 0) {
        char p[PATH_MAX];
        vpath(p, path);
        fd = open(p, O_RDWR | O_CLOEXEC);
        if (fd < 0) UNLOCK_RET(-errno);
        own = 1;
    }
    struct stat st;
    int res = fstat(fd, &st) < 0 || ftruncate(fd, size) < 0 ? -errno : 0;
    struct node *n = res ? NULL : node_of_fd(fd);
    if (n && size < st.st_size && (n->trunc_low < 0 || size < n->trunc_low)) n->trunc_low = size;
    if (own) close(fd);
    UNLOCK_RET(res);
}

static int cf_fallocate(const char *path, int mode, off_t off, off_t len, struct fuse_file_info *fi) {
    (void)path;
    LOCK();
    if (fallocate(fi->fh, mode, off, len) < 0) UNLOCK_RET(-errno);
    struct node *n = node_of_fd(fi->fh);
    if (n) {
        mark(n, off, len);
        n->written += len;
    }
    UNLOCK_RET(0);
}

static off_t cf_lseek(const char *path, off_t off, int whence, struct fuse_file_info *fi) {
    (void)path;
    off_t r = lseek(fi->fh, off, whence);
    return r < 0 ? -errno : r;
}

static int cf_fsync(const char *path, int datasync, struct fuse_file_info *fi) {
    (void)path, (void)datasync;
    if (fi->fh == CTL_FH) return 0;
    LOCK();
    struct node *n = node_of_fd(fi->fh);
    UNLOCK_RET(n ? sync_node(n, fi->fh) : -EIO);
}

/* Directories are known by path: opendir keeps it for fsyncdir (libfuse passes none). */
static int cf_opendir(const char *path, struct fuse_file_info *fi) {
    char *copy = strdup(path);
    if (!copy) return -ENOMEM;
    fi->fh = (uintptr_t)copy;
    return 0;
}

static int cf_releasedir(const char *path, struct fuse_file_info *fi) {
    (void)path;
    free((char *)(uintptr_t)fi->fh);
    return 0;
}

static int cf_fsyncdir(const char *path, int datasync, struct fuse_file_info *fi) {
    (void)path, (void)datasync;
    LOCK();
    UNLOCK_RET(sync_dir((const char *)(uintptr_t)fi->fh));
}

static int cf_flush(const char *path, struct fuse_file_info *fi) {
    (void)path, (void)fi;
    return 0;
}

static int cf_release(const char *path, struct fuse_file_info *fi) {
    (void)path;
    if (fi->fh != CTL_FH) close(fi->fh);
    return 0;
}

static int cf_chmod(const char *path, mode_t mode, struct fuse_file_info *fi) {
    char p[PATH_MAX];
    if (fi) return fchmod(fi->fh, mode) < 0 ? -errno : 0;
    vpath(p, path);
    return chmod(p, mode) < 0 ? -errno : 0;
}

static int cf_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi) {
    char p[PATH_MAX];
    if (fi) return fchown(fi->fh, uid, gid) < 0 ? -errno : 0;
    vpath(p, path);
    return lchown(p, uid, gid) < 0 ? -errno : 0;
}

static int cf_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi) {
    char p[PATH_MAX];
    if (fi) return futimens(fi->fh, tv) < 0 ? -errno : 0;
    vpath(p, path);
    return utimensat(AT_FDCWD, p, tv, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
}

static int cf_statfs(const char *path, struct statvfs *st) {
    (void)path;
    return statvfs(vol_root, st) < 0 ? -errno : 0;
}

static const struct fuse_operations ops = {
    .init = cf_init,
    .getattr = cf_getattr,
    .readdir = cf_readdir,
    .mkdir = cf_mkdir,
    .rmdir = cf_rmdir,
    .unlink = cf_unlink,
    .rename = cf_rename,
    .mknod = cf_mknod,
    .create = cf_create,
    .open = cf_open,
    .read = cf_read,
    .write = cf_write,
    .truncate = cf_truncate,
    .fallocate = cf_fallocate,
    .lseek = cf_lseek,
    .fsync = cf_fsync,
    .opendir = cf_opendir,
    .releasedir = cf_releasedir,
    .fsyncdir = cf_fsyncdir,
    .flush = cf_flush,
    .release = cf_release,
    .chmod = cf_chmod,
    .chown = cf_chown,
    .utimens = cf_utimens,
    .statfs = cf_statfs,
};

/* ---- start: vol/ rebuilt from the durable state ---- */

static int copy_sparse(const char *from, const char *to) {
    int in = open(from, O_RDONLY | O_CLOEXEC), out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (in < 0 || out < 0) return -1;
    struct stat st;
    fstat(in, &st);
    static char buf[1 << 20];
    off_t pos = 0;
    while (pos < st.st_size) {
        off_t data = lseek(in, pos, SEEK_DATA);
        if (data < 0) break;
        off_t hole = lseek(in, data, SEEK_HOLE);
        for (pos = data; pos < hole;) {
            ssize_t n = pread(in, buf, hole - pos < (off_t)sizeof buf ? hole - pos : (off_t)sizeof buf, pos);
            if (n <= 0 || pwrite(out, buf, n, pos) != n) return -1;
            pos += n;
        }
    }
    int res = ftruncate(out, st.st_size);
    fchmod(out, st.st_mode & 07777);
    close(in);
    close(out);
    return res;
}

static unsigned long store_id_of(ino_t ino) {
    DIR *d = opendir(store_root);
    struct dirent *e;
    unsigned long id = 0;
    while (d && (e = readdir(d)))
        if (e->d_ino == ino) {
            id = strtoul(e->d_name, NULL, 10);
            break;
        }
    if (d) closedir(d);
    return id;
}

static void rebuild(const char *rel) {
    char t[PATH_MAX], v[PATH_MAX], tsub[PATH_MAX], vsub[PATH_MAX];
    snprintf(t, PATH_MAX, "%s%s", tree_root, rel);
    snprintf(v, PATH_MAX, "%s%s", vol_root, rel);
    mkdir(v, 0755);
    DIR *d = opendir(t);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(tsub, PATH_MAX, "%s/%s", t, e->d_name);
        if (!strcmp(e->d_name, TMP_NAME)) {
            unlink(tsub);
            continue;
        }
        struct stat st;
        if (lstat(tsub, &st) < 0) continue;
        char r[PATH_MAX];
        snprintf(r, PATH_MAX, "%s/%s", rel, e->d_name);
        snprintf(vsub, PATH_MAX, "%s%s", vol_root, r);
        if (S_ISDIR(st.st_mode)) {
            rebuild(r);
        } else if (S_ISREG(st.st_mode) && copy_sparse(tsub, vsub) == 0) {
            struct stat vst;
            lstat(vsub, &vst);
            node_new(vst.st_ino, store_id_of(st.st_ino));
        }
    }
    closedir(d);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: cutfs BACKING_DIR MOUNTPOINT [fuse options]\n");
        return 2;
    }
    char *backing = realpath(argv[1], NULL);
    if (!backing) {
        perror(argv[1]);
        return 1;
    }
    snprintf(vol_root, PATH_MAX, "%s/vol", backing);
    snprintf(tree_root, PATH_MAX, "%s/tree", backing);
    snprintf(store_root, PATH_MAX, "%s/store", backing);
    mkdir(tree_root, 0755);
    mkdir(store_root, 0755);
    rm_tree(vol_root);
    /* drop store files no durable name refers to; ids go on after the largest */
    DIR *d = opendir(store_root);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char sp[PATH_MAX];
        struct stat st;
        snprintf(sp, PATH_MAX, "%s/%s", store_root, e->d_name);
        unsigned long id = strtoul(e->d_name, NULL, 10);
        if (lstat(sp, &st) == 0 && st.st_nlink < 2) unlink(sp);
        else if (id >= next_id) next_id = id + 1;
    }
    if (d) closedir(d);
    rebuild("");
    char *fargv[] = {argv[0], "-f", "-o", "fsname=cutfs", argv[2], NULL};
    return fuse_main(5, fargv, &ops, NULL);
}
