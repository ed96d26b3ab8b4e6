/*
 * containerizer-supervisor: reaps one container's workload and records how it ended.
 *
 * The Python service must be able to die and restart while containers keep running, and a Python
 * process per container costs far more than the 3 MiB RSS budget. So each container gets this
 * small program: it forks the workload (pid 1 of a new pid namespace unless --no-namespaces),
 * confines it, tells the service over its stdout whether the exec succeeded, waits for the
 * workload, and writes the exit status atomically to --status-file, where a restarted service
 * finds it.
 *
 * Usage:
 *   containerizer-supervisor --config-fd FD
 *
 * The configuration comes through FD (the service passes 0, a pipe it writes and closes), never
 * through argv: the workload's argv and environment hold secrets, and /proc/PID/cmdline is
 * readable by every local user. It is a sequence of NUL-terminated strings, at most
 * CONFIG_MAX_BYTES in all, read to EOF:
 *
 *   --status-file F --sandbox DIR [--cgroup-procs P]... [--cwd DIR]
 *   [--uid N --gid N [--groups N,N,...]] [--hostname NAME] [--env K=V]... [--no-namespaces]
 *   [--netns PATH] [--ns KIND=PATH|host]... [--sysctl KEY=VALUE]...
 *   [--rootfs-lower LAYER[:LAYER...] --rootfs-dir DIR [--read-only-root]]
 *   [--bind SRC --to DST [--read-only] [--propagation rslave|rshared|private]]...
 *   (--privileged | --capabilities MASK --seccomp LEN <LEN bytes>) [--no-new-privs]
 *   [--masked-path P]... [--readonly-path P]... [--cgroupns]
 *   [--log-file PATH] [--attach-socket PATH [--stdin [--stdin-once]] [--tty]]
 *   [--output-max-size N --output-max-files K] -- argv...
 * or, to run one more command in a running container (exec mode, see below):
 *   --exec-in PID --exec-start-time T [--cgroup-procs P]... [--cwd DIR]
 *   [--uid N --gid N [--groups N,N,...]] [--env K=V]...
 *   (--privileged | --capabilities MASK --seccomp LEN <LEN bytes>) [--no-new-privs] -- argv...
 * or, as containerd's logging binary for a task's CRI log (see "log relay mode" below):
 *   containerizer-supervisor --log-relay LOG --pid-file FILE
 * or as its logging binary for a task's sandbox files, rotated (see "sandbox relay mode" below):
 *   containerizer-supervisor --sandbox-relay DIR --output-max-size N --output-max-files K
 *                            --uid U --gid G
 *
 * --seccomp LEN is followed by LEN raw bytes (not NUL-terminated): a BPF program, an array of
 * struct sock_filter, compiled by the service (adapter/seccomp.py). --seccomp 0 loads no filter
 * (CRI's "unconfined"); the capabilities are cut all the same.
 *
 * --uid N --gid N [--groups N,...]: numbers only, resolved by the service from the right
 * /etc/passwd and /etc/group (adapter/core/identity.py). No name is ever looked up here: glibc's
 * name service, called inside an image's root, would dlopen() the image's libnss_*.so while this
 * process holds every capability. The groups are set exactly (none when the list is empty);
 * without --uid the workload runs as root with the supervisor's groups.
 *
 * --ns KIND=PATH|host, KIND one of ipc, uts, pid: join the namespace bound at PATH (a pod's, e.g.
 * /proc/PID/ns/KIND of its holder) or stay in the host's, instead of a namespace of the
 * container's own. The files are opened before any namespace changes (their paths are the
 * host's), and setns() with the kind's flag refuses a file that is not a namespace of that kind.
 * The pid namespace is entered by the supervisor before it forks the init, which then is not pid
 * 1 and reaps orphans as a child subreaper instead. --hostname applies only to a UTS namespace
 * of the container's own.
 *
 * --sysctl KEY=VALUE: written to /proc/sys/KEY (dots as slashes) inside the container's
 * namespaces, once its /proc is mounted and before any capability is dropped. The service
 * allows only namespaced keys (adapter/supervisor/client.py).
 *
 * --sandbox DIR: the workload's stdout and stderr are DIR/stdout and DIR/stderr, appended to.
 * DIR is opened with O_NOFOLLOW and the files relative to it with O_NOFOLLOW, so a workload
 * that replaced them with symlinks cannot make a later launch write elsewhere; a file that is
 * not regular or has other links is refused. Once the workload's user is known, DIR (0750) and
 * both files (0640) are given to it: what it writes is its own, and other host users read none.
 *
 * --output-max-size N --output-max-files K (without --log-file, whose rotation is the kubelet's):
 * the supervisor carries the output through pipes and appends it to DIR/stdout and DIR/stderr
 * itself; a file that reached N bytes is renamed stdout.1 (stdout.1 to stdout.2, and so on; the
 * oldest, stdout.<K-1>, removed) and a new one made, so a stream never keeps more than K files of
 * N bytes and one read each. Nothing the workload put at these names is followed: see "rotated
 * by size" below.
 *
 * --netns PATH: the child joins the network namespace bound at PATH (setns(CLONE_NEWNET), e.g.
 * /run/netns/NAME prepared by the network isolator) after joining its cgroups and before the
 * other unshares, so the workload's first instruction already runs on the container's network.
 *
 * --rootfs-lower LAYERS --rootfs-dir DIR: the workload's / is an overlay of the image's read-only
 * layer directories (LAYERS: topmost first, colon-separated, as overlay's lowerdir) with
 * DIR/upper and DIR/work, mounted at DIR/merged inside the container's
 * own mount namespace (so the mount dies with the container; nothing on the host to leak), with
 * a fresh /proc, a minimal /dev (null zero full random urandom tty, a private devpts and shm),
 * /sys (read-only unless --privileged) and each --bind SRC --to DST (host path onto a path
 * inside the rootfs; --read-only after one makes it read-only), then pivot_root (Mesos'
 * filesystem/linux isolator). --read-only-root remounts the overlay read-only once the binds are
 * in place (the binds, /dev, /proc and /sys keep their own flags). With --cgroupns the child
 * also gets a cgroup namespace (after it joined its cgroups, so they are its root) and
 * /sys/fs/cgroup is a read-only tmpfs holding each of the host's cgroup hierarchies mounted
 * read-only from inside that namespace.
 *
 * Mount propagation: the container's mount namespace is private unless a bind asks for
 * --propagation rslave or rshared; then it is a slave of the host's (host mounts propagate in,
 * the container's never out), an rslave bind is a slave of its source and an rshared bind is a
 * peer of it, so that mounts made in it propagate back out (its source must be a shared mount
 * on the host, as Kubernetes requires). An rshared source is cloned (open_tree) right after the
 * mount namespace is created, while the copies of the host's mounts are still peers of theirs:
 * a bind made after the namespace became a slave would only be a slave. Every other bind is
 * private.
 *
 * --log-file PATH (CRI): instead of the sandbox's files, the workload's stdout and stderr are two
 * pipes, and the supervisor appends what comes through them to PATH (absolute; the caller makes
 * its directory) as the kubelet reads it, one record a line:
 *   <time, RFC 3339 UTC with nanoseconds> <stdout|stderr> <F|P> <content without the newline>
 * F ends a line; a line longer than 16 KiB is cut into P records and an F for the rest; output
 * that ends without a newline is flushed as F. The time is when the supervisor read the data.
 * PATH is opened before the fork as the sandbox's files are (no symlink, a regular file with one
 * link, 0640). SIGUSR1 makes the supervisor open PATH again (the kubelet renamed the file to
 * rotate it). When the workload has ended, what the pipes still hold is copied (until a pipe is
 * empty: orphans sharing a pid namespace may keep one open) before the status is recorded, so
 * whoever sees the exit finds all the output. Memory: a fixed buffer per stream.
 *
 * --attach-socket PATH (CRI Attach): clients connect to a unix socket at PATH to get what the
 * workload writes (as it goes to the log, or to the sandbox's files, which the supervisor then
 * writes) and, with --stdin, to write its stdin
 * (a pipe, else /dev/null); --stdin-once ends that input when the first client's input ends;
 * --tty makes a pty the workload's stdio and controlling terminal. The framing, and why no
 * client can block the workload: see "attach socket" below.
 *
 * Exec mode (--exec-in PID, which must come first, with --exec-start-time T): run argv inside the
 * running container whose init has host pid PID and start time T, confined as its workload (CRI
 * ExecSync). The configuration comes through --config-fd N with N above 2: stdin, stdout and
 * stderr are the command's own. The namespaces of PID (ipc, uts, net, pid, cgroup, mnt; those
 * it shares with us are skipped) are opened first, then PID's start time is checked against T
 * (a reused pid would have named another process's namespaces), the cgroups joined (host
 * paths), each namespace entered (mnt last: root and cwd become the container's), and a child
 * forked (a pid namespace applies to children only) that runs the workload's own steps: --cwd,
 * bounding set, user, confinement, exec. The supervisor forwards the init's set of signals to
 * it and exits with its status, 128 + n for signal n. A failure before the exec is told as a
 * shell tells it: `containerizer-supervisor: <step>: <reason>` on stderr and status 126, or 127
 * when the command is not found. The command is in the container's cgroups and pid namespace,
 * so a destroy (the cgroups killed, or the init, whose pid namespace ends with it) ends it too.
 *
 * Confinement, unless --privileged (the kernel's capability rules are what make this work):
 *   - the bounding set is cut to MASK in the container's init (so it holds nothing the workload
 *     could borrow) and the workload, and ambient capabilities are cleared;
 *   - --masked-path P: a file gets /dev/null bound over it, a directory an empty read-only
 *     tmpfs; --readonly-path P is bound onto itself read-only (nosuid, nodev, noexec); paths that
 *     do not exist are skipped;
 *   - as root the workload keeps MASK as its effective, permitted and inheritable sets; as any
 *     other user setuid() clears them all;
 *   - no_new_privs for any user but root (and for root with --no-new-privs), so a setuid binary
 *     gives nothing back;
 *   - the seccomp filter, loaded last. Without no_new_privs the kernel lets only a holder of
 *     CAP_SYS_ADMIN load a filter, so root keeps it until the filter is in and then drops to
 *     MASK with capset (which the filter allows) right before execve.
 *
 * Handshake (one line on stdout, then stdout is /dev/null):
 *   ok <child_host_pid> <child_start_time> <supervisor_start_time>
 * (the child is the container's init with namespaces, the workload itself without)
 *   error <step>: <reason>                       (exit status 1 or 2; no status file is written)
 * Steps a user's request causes: exec (missing or unusable binary), user (setgroups, setgid or
 * setuid refused), cwd (missing working directory), sandbox, stdout, stderr. `args` is a
 * configuration the service should never have sent, or one larger than CONFIG_MAX_BYTES.
 * Others name what failed: ipcns, utsns, pidns (a namespace to join), sysctl, bind, rootfs, ...
 * Start times are field 22 of /proc/PID/stat. The supervisor reports them itself because it is the
 * only process that can read them without a race: the workload stays at least a zombie until the
 * supervisor reaps it, and the supervisor may be gone before the service gets to look.
 *
 * Status file:
 *   exited <code> | signaled <signo>
 *   finished <unix time, seconds.milliseconds>
 *
 * Signals: SIGTERM, SIGINT, SIGHUP and friends are ignored so that only SIGKILL ends the
 * supervisor; signals meant for the container go from the service to the container's init.
 * With namespaces, pid 1 of the new pid namespace is a tiny init of ours (the forked child), not
 * the workload: the kernel delivers to a namespace's pid 1 only the signals it handles, so a
 * plain workload as pid 1 would ignore SIGTERM and never reap orphans. The init forwards the
 * usual termination signals to the workload (pid 2), reaps every orphan, and when the workload
 * ends passes its wait status to the supervisor over a pipe and exits; the kernel then kills
 * every other process of the namespace. A SIGKILL to the init ends the whole container.
 * In a pod's pid namespace or the host's (--ns pid=) the init is not pid 1: it still forwards
 * and reaps (as a child subreaper), but its end kills nothing else; the runtime's cgroup kill
 * ends what the workload left.
 * With --log-file, SIGUSR1 to the supervisor reopens the log (it is ignored otherwise).
 *
 * Exit status: 0 status recorded; 1 the workload could not be started (error line written);
 * 2 bad configuration or a failure before the fork (error line written); 3 waitpid failed;
 * 4 the status file could not be written. Exec mode: see above.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* --- what glibc declares and musl does not ------------------------------------------------- */

/* The supervisor is built static against musl where musl-gcc is installed (supervisor/Makefile):
 * a launch execs it once or twice, and glibc's start-up alone costs ten times musl's. musl has
 * no wrappers for the new mount API (glibc 2.36) nor close_range (glibc 2.34): there they are
 * the system calls themselves, with the kernel's constants and struct mount_attr. Renamed, so
 * that a libc which declares them one day does not clash with ours. */
#if !defined(__GLIBC__) || __GLIBC__ * 100 + __GLIBC_MINOR__ < 236
#include <linux/mount.h>
static int compat_open_tree(int dir, const char *path, unsigned int flags)
{
    return (int)syscall(SYS_open_tree, (long)dir, path, (unsigned long)flags);
}

static int compat_move_mount(int from_dir, const char *from, int to_dir, const char *to,
                             unsigned int flags)
{
    return (int)syscall(SYS_move_mount, (long)from_dir, from, (long)to_dir, to,
                        (unsigned long)flags);
}

static int compat_mount_setattr(int dir, const char *path, unsigned int flags,
                                struct mount_attr *attr, size_t size)
{
    return (int)syscall(SYS_mount_setattr, (long)dir, path, (unsigned long)flags, attr, size);
}

static int compat_fsopen(const char *fstype, unsigned int flags)
{
    return (int)syscall(SYS_fsopen, fstype, (unsigned long)flags);
}

static int compat_fsconfig(int context, unsigned int command, const char *key, const void *value,
                           int aux)
{
    return (int)syscall(SYS_fsconfig, (long)context, (unsigned long)command, key, value,
                        (long)aux);
}

static int compat_fsmount(int context, unsigned int flags, unsigned int attr_flags)
{
    return (int)syscall(SYS_fsmount, (long)context, (unsigned long)flags,
                        (unsigned long)attr_flags);
}
#define open_tree compat_open_tree
#define move_mount compat_move_mount
#define mount_setattr compat_mount_setattr
#define fsopen compat_fsopen
#define fsconfig compat_fsconfig
#define fsmount compat_fsmount
#endif

#if !defined(__GLIBC__) || __GLIBC__ * 100 + __GLIBC_MINOR__ < 234
#include <linux/close_range.h>
static int compat_close_range(unsigned int first, unsigned int last, int flags)
{
    return (int)syscall(SYS_close_range, (unsigned long)first, (unsigned long)last, (long)flags);
}
#define close_range compat_close_range
#endif

/* What strerror says. musl words some errors otherwise than glibc ("Symbolic link loop"), and
 * the reasons reach the service's callers: in either build they read as glibc has them. The
 * errors that differ among those this program's system calls can return; any other is libc's. */
static const char *error_text(int err)
{
#ifndef __GLIBC__
    static const struct {
        int err;
        const char *text;
    } glibc_wording[] = {
        {0, "Success"},
        {EIO, "Input/output error"},
        {ECHILD, "No child processes"},
        {ENOMEM, "Cannot allocate memory"},
        {EBUSY, "Device or resource busy"},
        {EXDEV, "Invalid cross-device link"},
        {EMFILE, "Too many open files"},
        {ENOTTY, "Inappropriate ioctl for device"},
        {ESPIPE, "Illegal seek"},
        {ERANGE, "Numerical result out of range"},
        {EDEADLK, "Resource deadlock avoided"},
        {ENAMETOOLONG, "File name too long"},
        {ELOOP, "Too many levels of symbolic links"},
        {EOVERFLOW, "Value too large for defined data type"},
        {ELIBBAD, "Accessing a corrupted shared library"},
        {ENOTSOCK, "Socket operation on non-socket"},
        {EOPNOTSUPP, "Operation not supported"},
        {EADDRINUSE, "Address already in use"},
        {ENOTCONN, "Transport endpoint is not connected"},
        {ETIMEDOUT, "Connection timed out"},
        {EUCLEAN, "Structure needs cleaning"},
        {EDQUOT, "Disk quota exceeded"},
    };
    for (size_t i = 0; i < sizeof glibc_wording / sizeof glibc_wording[0]; i++)
        if (glibc_wording[i].err == err)
            return glibc_wording[i].text;
#endif
    return strerror(err);
}

#define HOSTNAME_MAX_LEN 63
#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define CONFIG_MAX_BYTES (16u << 20) /* far above what execve accepts as argv + environment */
#define CONFIG_CHUNK (64u << 10)
#define CGROUP_MOUNTS "/sys/fs/cgroup"
#ifndef CLONE_NEWCGROUP
#define CLONE_NEWCGROUP 0x02000000
#endif
/* The kernel's bound on supplementary groups (musl's limits.h has 32 as NGROUPS_MAX). */
#define KERNEL_GROUPS_MAX 65536

struct bind {
    const char *source; /* host path */
    const char *target; /* absolute path inside the rootfs */
    int read_only;
    unsigned long propagation; /* MS_PRIVATE, MS_SLAVE or MS_SHARED */
    int tree;                  /* an rshared bind: its source cloned by open_tree, else -1 */
};

/* The namespaces a container may join (a pod's) or share with the host instead of its own. */
enum ns_kind { NS_IPC, NS_UTS, NS_PID, NS_USER, NS_KINDS };

static const struct {
    const char *name;
    int flag;
    const char *step;
} ns_kinds[NS_KINDS] = {
    {"ipc", CLONE_NEWIPC, "ipcns"},
    {"uts", CLONE_NEWUTS, "utsns"},
    {"pid", CLONE_NEWPID, "pidns"},
    {"user", CLONE_NEWUSER, "userns"}};

enum { GIVEN_UID = 1, GIVEN_GID = 2, GIVEN_GROUPS = 4 };

struct ns_choice {
    const char *path; /* a namespace file to join, or NULL */
    int host;         /* stay in the supervisor's (the host's) */
};

struct options {
    const char *status_file;
    const char *sandbox;
    const char *cwd;
    int identity_given; /* GIVEN_*: with --uid and --gid the workload becomes them */
    uid_t uid;
    gid_t gid;
    gid_t *groups; /* --groups, exactly (none for an empty list) */
    size_t n_groups;
    const char *hostname;
    const char *netns;
    const char *log_file;        /* CRI log mode: stdout and stderr become records in it */
    const char *attach_socket;   /* with log_file: clients attach to the workload's stdio */
    int keep_stdin;              /* --stdin: the workload's stdin a pipe the clients write */
    int stdin_once;              /* --stdin-once: closed when the first client's input ends */
    unsigned long long output_max_size; /* the sandbox's files rotate at this size; 0: never */
    unsigned int output_max_files;      /* and a stream keeps this many, the current one too */
    const char *exec_in;         /* exec mode: the host pid of the container's init */
    const char *exec_start_time; /* and its start time, so that a reused pid is refused */
    const char *exec_report_fd;  /* where a failure before the command's exec is reported */
    const char *resize_fd;       /* exec with --tty: "COLUMNS ROWS" lines set its window size */
    const char *rootfs_lower; /* image layers (read-only lower layers, a:b:c) or NULL */
    const char *rootfs_dir;   /* holds upper/, work/ and merged/ for the overlay */
    struct bind *binds;
    size_t n_binds;
    int namespaces;
    char **cgroup_procs;   /* NULL-terminated */
    char **env;            /* NULL-terminated, the workload's whole environment */
    char **argv;           /* NULL-terminated */
    char **masked_paths;   /* NULL-terminated */
    char **readonly_paths; /* NULL-terminated */
    char **sysctls;        /* NULL-terminated KEY=VALUE */
    struct ns_choice ns[NS_KINDS];
    int read_only_root;
    /* --userns UID:GID:SIZE: a user namespace of the container's own, mapping its ids 0..SIZE-1
     * onto host uids UID.. and gids GID..; size 0 without */
    unsigned long userns_uid, userns_gid, userns_size;
    /* confinement */
    int privileged;
    int no_new_privs;
    int tty; /* exec mode: stdin is a terminal, which becomes the command's controlling one;
              * a launch (with --attach-socket): a pty of ours is the workload's stdio */
    int cgroupns;
    int have_capabilities;
    unsigned long long capabilities;
    int last_capability; /* /proc/sys/kernel/cap_last_cap */
    int have_seccomp;
    struct sock_fprog seccomp; /* no filter (len 0) after --seccomp 0 */
};

/* What the configuration occupies: freed once the workload runs, so a large argv does not stay
 * in the supervisor's (or the init's) memory for the container's whole life. */
static struct {
    char *text;
    void *lists[16];
    size_t n_lists;
} config_memory;

static void release_config(void)
{
    free(config_memory.text);
    for (size_t i = 0; i < config_memory.n_lists; i++)
        free(config_memory.lists[i]);
    memset(&config_memory, 0, sizeof config_memory);
}

/* Writes all of buf, retrying on EINTR and short writes; returns 0 or -1. */
static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Set when the configuration starts with --exec-in: failures are then told as a shell tells
 * them, to whoever runs the command (exit status 126, or 127 for a command not found). */
static int exec_mode;
#define EXEC_CANNOT_RUN 126
#define EXEC_NOT_FOUND 127

/* Reports a failure before any workload runs and exits with `status`: the handshake line
 * `error TEXT` on stdout, or in exec mode `containerizer-supervisor: TEXT` on stderr. */
/* Exec mode: the caller's pipe that tells a command that never ran (its exec failed, or the
 * container could not be joined) from a command that ran and exited 126 or 127. */
static int exec_report_fd = -1;

static void report_failure(const char *text, int status)
{
    char line[600];
    if (exec_mode && exec_report_fd >= 0) {
        int n = snprintf(line, sizeof line, "error %s\n", text);
        if (n > 0)
            (void)write_all(exec_report_fd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    }
    int n = snprintf(line, sizeof line, "%s%s\n", exec_mode ? "containerizer-supervisor: " : "error ",
                     text);
    if (n >= (int)sizeof line) {
        n = (int)sizeof line - 1;
        line[n - 1] = '\n';
    }
    if (n > 0)
        (void)write_all(exec_mode ? STDERR_FILENO : STDOUT_FILENO, line, (size_t)n);
    _exit(status);
}

/* Reports a launch error before any child exists: the handshake line, then a non-zero exit. */
static void fail_because(const char *step, const char *detail, const char *reason)
{
    char text[512];
    if (detail != NULL)
        snprintf(text, sizeof text, "%s: %s: %s", step, detail, reason);
    else
        snprintf(text, sizeof text, "%s: %s", step, reason);
    report_failure(text, exec_mode ? EXEC_CANNOT_RUN : 2);
}

static void fail(const char *step, const char *detail, int err)
{
    fail_because(step, detail, error_text(err));
}

static void usage_error(const char *message, const char *arg)
{
    char text[512];
    snprintf(text, sizeof text, "args: %s%s%.200s", message, arg ? " " : "", arg ? arg : "");
    report_failure(text, exec_mode ? EXEC_CANNOT_RUN : 2);
}

static void *allocate(size_t count, size_t size)
{
    void *memory = calloc(count, size);
    if (memory == NULL)
        fail("args", "allocating the configuration", ENOMEM);
    return memory;
}

/* --- the configuration ------------------------------------------------------------------- */

/* Reads fd to EOF into a heap buffer of at most CONFIG_MAX_BYTES; *size gets its length. */
static char *read_config(int fd, size_t *size)
{
    size_t capacity = CONFIG_CHUNK, length = 0;
    char *text = malloc(capacity);
    for (;;) {
        if (text == NULL)
            fail("args", "reading the configuration", ENOMEM);
        if (length == capacity) {
            if (capacity > CONFIG_MAX_BYTES)
                usage_error("the configuration is larger than 16 MiB", NULL);
            capacity = capacity * 2 > CONFIG_MAX_BYTES ? CONFIG_MAX_BYTES + 1 : capacity * 2;
            text = realloc(text, capacity);
            continue;
        }
        ssize_t n = read(fd, text + length, capacity - length);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail("args", "reading the configuration", errno);
        if (n == 0)
            break;
        length += (size_t)n;
    }
    if (length > CONFIG_MAX_BYTES)
        usage_error("the configuration is larger than 16 MiB", NULL);
    *size = length;
    return text;
}

struct cursor {
    char *next;
    char *end;
};

/* The next NUL-terminated string, or NULL at the end. */
static char *next_string(struct cursor *at)
{
    if (at->next >= at->end)
        return NULL;
    char *nul = memchr(at->next, '\0', (size_t)(at->end - at->next));
    if (nul == NULL)
        usage_error("the configuration does not end with a NUL", NULL);
    char *string = at->next;
    at->next = nul + 1;
    return string;
}

static char *option_value(struct cursor *at, const char *option)
{
    char *value = next_string(at);
    if (value == NULL)
        usage_error("missing value after", option);
    return value;
}

/* --seccomp LEN <bytes>: copied out, so the program is aligned for struct sock_filter.
 * --seccomp 0: no filter at all. */
static void take_seccomp(struct cursor *at, struct options *opts, int fill)
{
    char *end;
    const char *text = option_value(at, "--seccomp");
    unsigned long length = strtoul(text, &end, 10);
    if (*text == '\0' || *end != '\0' || length % sizeof(struct sock_filter) != 0 ||
        length / sizeof(struct sock_filter) > BPF_MAXINSNS ||
        length > (size_t)(at->end - at->next))
        usage_error("--seccomp needs the length of a BPF program and its bytes, got", text);
    opts->have_seccomp = 1;
    if (fill && length > 0) {
        struct sock_filter *program = allocate(1, length);
        memcpy(program, at->next, length);
        config_memory.lists[config_memory.n_lists++] = program;
        opts->seccomp.len = (unsigned short)(length / sizeof(struct sock_filter));
        opts->seccomp.filter = program;
    }
    at->next += length;
}

enum list_id { L_ENV, L_CGROUPS, L_BINDS, L_MASKED, L_READONLY, L_SYSCTLS, L_COUNT };

struct lists {
    size_t count[L_COUNT];
};

static void add_to(char **list, size_t *count, char *value, int fill)
{
    if (fill)
        list[*count] = value;
    (*count)++;
}

/* Options with a value that is kept as is; returns 0 if `name` is not one of them. */
static int take_value(struct options *opts, const char *name, const char *value)
{
    static const struct {
        const char *name;
        size_t offset;
    } fields[] = {
        {"--status-file", offsetof(struct options, status_file)},
        {"--sandbox", offsetof(struct options, sandbox)},
        {"--cwd", offsetof(struct options, cwd)},
        {"--hostname", offsetof(struct options, hostname)},
        {"--netns", offsetof(struct options, netns)},
        {"--log-file", offsetof(struct options, log_file)},
        {"--attach-socket", offsetof(struct options, attach_socket)},
        {"--exec-in", offsetof(struct options, exec_in)},
        {"--exec-start-time", offsetof(struct options, exec_start_time)},
        {"--exec-report-fd", offsetof(struct options, exec_report_fd)},
        {"--resize-fd", offsetof(struct options, resize_fd)},
        {"--rootfs-lower", offsetof(struct options, rootfs_lower)},
        {"--rootfs-dir", offsetof(struct options, rootfs_dir)},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (strcmp(name, fields[i].name) == 0) {
            *(const char **)((char *)opts + fields[i].offset) = value;
            return 1;
        }
    return 0;
}

static int take_flag(struct options *opts, const char *name)
{
    if (strcmp(name, "--no-namespaces") == 0)
        opts->namespaces = 0;
    else if (strcmp(name, "--privileged") == 0)
        opts->privileged = 1;
    else if (strcmp(name, "--no-new-privs") == 0)
        opts->no_new_privs = 1;
    else if (strcmp(name, "--cgroupns") == 0)
        opts->cgroupns = 1;
    else if (strcmp(name, "--read-only-root") == 0)
        opts->read_only_root = 1;
    else if (strcmp(name, "--tty") == 0)
        opts->tty = 1;
    else if (strcmp(name, "--stdin") == 0)
        opts->keep_stdin = 1;
    else if (strcmp(name, "--stdin-once") == 0)
        opts->stdin_once = 1;
    else
        return 0;
    return 1;
}

static unsigned long propagation_of(const char *value)
{
    if (strcmp(value, "rslave") == 0)
        return MS_SLAVE;
    if (strcmp(value, "rshared") == 0)
        return MS_SHARED;
    if (strcmp(value, "private") != 0)
        usage_error("--propagation needs rslave, rshared or private, got", value);
    return MS_PRIVATE;
}

static void take_bind_part(struct options *opts, const char *name, char *value, size_t n_binds,
                           int fill)
{
    struct bind *last = n_binds > 0 ? &opts->binds[n_binds - 1] : NULL;
    if (strcmp(name, "--read-only") == 0) {
        if (fill && (last == NULL || last->target == NULL))
            usage_error("--read-only must follow a --bind SRC --to DST", NULL);
        if (fill)
            last->read_only = 1;
        return;
    }
    if (strcmp(name, "--propagation") == 0) {
        if (fill && (last == NULL || last->target == NULL))
            usage_error("--propagation must follow a --bind SRC --to DST", NULL);
        if (fill)
            last->propagation = propagation_of(value);
        return;
    }
    /* --to */
    if (fill && (last == NULL || last->target != NULL || value[0] != '/'))
        usage_error("--to needs an absolute path after a --bind, got", value);
    if (fill)
        last->target = value;
}

/* A uid or gid: digits only, and never (uid_t)-1, which the kernel reads as "unchanged". */
static unsigned int parse_id(const char *value, const char *option)
{
    char *end;
    errno = 0;
    unsigned long id = strtoul(value, &end, 10);
    if (value[0] < '0' || value[0] > '9' || *end != '\0' || errno != 0 || id >= UINT_MAX)
        usage_error(option, value);
    return (unsigned int)id;
}

/* --groups N,N,...: every gid, exactly; an empty list is no supplementary group at all. */
static void take_groups(struct options *opts, const char *value, int fill)
{
    size_t count = value[0] == '\0' ? 0 : 1;
    for (const char *c = value; *c != '\0'; c++)
        count += *c == ',';
    if (count > KERNEL_GROUPS_MAX)
        usage_error("--groups names more groups than the kernel takes:", value);
    opts->n_groups = count;
    if (!fill || count == 0)
        return;
    char copy[16];
    opts->groups = allocate(count, sizeof *opts->groups);
    config_memory.lists[config_memory.n_lists++] = opts->groups;
    for (size_t i = 0; i < count; i++) {
        size_t length = strcspn(value, ",");
        if (length == 0 || length >= sizeof copy)
            usage_error("--groups needs gids separated by commas, got", value);
        memcpy(copy, value, length);
        copy[length] = '\0';
        opts->groups[i] = parse_id(copy, "--groups needs gids separated by commas, got");
        value += length + (value[length] == ',');
    }
}

/* --ns KIND=PATH|host. */
static void take_namespace(struct options *opts, const char *value)
{
    const char *equals = strchr(value, '=');
    for (int kind = 0; equals != NULL && kind < NS_KINDS; kind++) {
        if (strncmp(value, ns_kinds[kind].name, (size_t)(equals - value)) != 0 ||
            ns_kinds[kind].name[equals - value] != '\0')
            continue;
        struct ns_choice *choice = &opts->ns[kind];
        if (choice->path != NULL || choice->host)
            usage_error("--ns names a namespace twice:", value);
        if (strcmp(equals + 1, "host") == 0)
            choice->host = 1;
        else if (equals[1] == '/')
            choice->path = equals + 1;
        else
            usage_error("--ns needs an absolute path or host, got", value);
        return;
    }
    usage_error("--ns needs ipc=, uts=, pid= or user= and a path or host, got", value);
}

/* --userns UID:GID:SIZE, each a number, SIZE above 0 and no range past the 32-bit id space. */
static void take_id_mapping(struct options *opts, const char *value)
{
    unsigned long long uid, gid, size;
    int used = 0;
    if (sscanf(value, "%llu:%llu:%llu%n", &uid, &gid, &size, &used) != 3 ||
        value[used] != '\0' || value[0] < '0' || value[0] > '9' || size == 0 ||
        uid + size > 0xFFFFFFFFULL || gid + size > 0xFFFFFFFFULL || uid == 0 || gid == 0)
        usage_error("--userns needs UID:GID:SIZE (host ids above 0), got", value);
    opts->userns_uid = (unsigned long)uid;
    opts->userns_gid = (unsigned long)gid;
    opts->userns_size = (unsigned long)size;
}

/* --sysctl KEY=VALUE: the key becomes a path under /proc/sys, so it may not climb out of it. */
static void check_sysctl(const char *value)
{
    const char *equals = strchr(value, '=');
    int bad = equals == NULL || equals == value || value[0] == '.' || equals[-1] == '.';
    for (const char *c = value; !bad && c < equals; c++)
        bad = *c == '/' || (c[0] == '.' && c[1] == '.');
    if (bad)
        usage_error("--sysctl needs KEY=VALUE with a dotted key, got", value);
}

/* The options of a container's identity, namespaces and kernel settings; 0 if `name` is none. */
static int take_container_option(struct options *opts, const char *name, char *value,
                                 size_t *n_sysctls, int fill)
{
    if (strcmp(name, "--uid") == 0) {
        opts->uid = parse_id(value, "--uid needs a number, got");
        opts->identity_given |= GIVEN_UID;
    } else if (strcmp(name, "--gid") == 0) {
        opts->gid = parse_id(value, "--gid needs a number, got");
        opts->identity_given |= GIVEN_GID;
    } else if (strcmp(name, "--groups") == 0) {
        take_groups(opts, value, fill);
        opts->identity_given |= GIVEN_GROUPS;
    }
    else if (strcmp(name, "--ns") == 0)
        take_namespace(opts, value);
    else if (strcmp(name, "--userns") == 0)
        take_id_mapping(opts, value);
    else if (strcmp(name, "--sysctl") == 0) {
        check_sysctl(value);
        add_to(opts->sysctls, n_sysctls, value, fill);
    } else
        return 0;
    return 1;
}

#define OUTPUT_FILES_MAX 100 /* the rotated files a stream may keep, as the service allows */

/* --output-max-size N (bytes, 0 never rotates) and --output-max-files K (1..OUTPUT_FILES_MAX);
 * returns 0 if `name` is neither. */
static int take_output_option(struct options *opts, const char *name, const char *value)
{
    char *end;
    int size = strcmp(name, "--output-max-size") == 0;
    if (!size && strcmp(name, "--output-max-files") != 0)
        return 0;
    errno = 0;
    unsigned long long number = strtoull(value, &end, 10);
    if (value[0] < '0' || value[0] > '9' || *end != '\0' || errno != 0 ||
        (size ? number > (1ULL << 62) : number < 1 || number > OUTPUT_FILES_MAX))
        usage_error(size ? "--output-max-size needs a number of bytes, got"
                         : "--output-max-files needs a number from 1 to 100, got",
                    value);
    if (size)
        opts->output_max_size = number;
    else
        opts->output_max_files = (unsigned int)number;
    return 1;
}

/* One pass over the options: counting list lengths (fill = 0), or filling the lists sized by
 * the first pass (fill = 1). Returns the cursor at argv. */
static struct cursor walk_options(struct cursor at, struct options *opts, struct lists *sizes,
                                  int fill)
{
    size_t n[L_COUNT] = {0};
    char *name;
    while ((name = next_string(&at)) != NULL && strcmp(name, "--") != 0) {
        if (take_flag(opts, name))
            continue;
        if (strcmp(name, "--read-only") == 0) {
            take_bind_part(opts, name, NULL, n[L_BINDS], fill);
            continue;
        }
        if (strcmp(name, "--seccomp") == 0) {
            take_seccomp(&at, opts, fill);
            continue;
        }
        char *value = option_value(&at, name);
        if (take_value(opts, name, value) ||
            take_container_option(opts, name, value, &n[L_SYSCTLS], fill) ||
            take_output_option(opts, name, value))
            continue;
        if (strcmp(name, "--capabilities") == 0) {
            char *end;
            errno = 0;
            opts->capabilities = strtoull(value, &end, 0);
            if (*value == '\0' || *end != '\0' || errno != 0)
                usage_error("--capabilities needs a bit mask, got", value);
            opts->have_capabilities = 1;
        } else if (strcmp(name, "--env") == 0) {
            if (strchr(value, '=') == NULL || value[0] == '=')
                usage_error("--env needs KEY=VALUE, got", value);
            add_to(opts->env, &n[L_ENV], value, fill);
        } else if (strcmp(name, "--cgroup-procs") == 0)
            add_to(opts->cgroup_procs, &n[L_CGROUPS], value, fill);
        else if (strcmp(name, "--masked-path") == 0)
            add_to(opts->masked_paths, &n[L_MASKED], value, fill);
        else if (strcmp(name, "--readonly-path") == 0)
            add_to(opts->readonly_paths, &n[L_READONLY], value, fill);
        else if (strcmp(name, "--bind") == 0) {
            if (fill)
                opts->binds[n[L_BINDS]] = (struct bind){value, NULL, 0, MS_PRIVATE, -1};
            n[L_BINDS]++;
        } else if (strcmp(name, "--to") == 0 || strcmp(name, "--propagation") == 0)
            take_bind_part(opts, name, value, n[L_BINDS], fill);
        else
            usage_error("unknown option:", name);
    }
    if (name == NULL)
        usage_error("no -- before the command", NULL);
    memcpy(sizes->count, n, sizeof n);
    return at;
}

static char **new_list(size_t count)
{
    char **list = allocate(count + 2, sizeof *list); /* + a default PATH, + NULL */
    config_memory.lists[config_memory.n_lists++] = list;
    return list;
}

/* Exec mode adds a process to a running container: what made the container (its files, names
 * and mounts) has no meaning there, and is refused rather than silently ignored. */
static void check_exec_options(const struct options *opts)
{
    const struct {
        int given;
        const char *option;
    } launch_only[] = {
        {opts->status_file != NULL, "--status-file"},
        {opts->sandbox != NULL, "--sandbox"},
        {opts->log_file != NULL, "--log-file"},
        {opts->attach_socket != NULL, "--attach-socket"},
        {opts->keep_stdin, "--stdin"},
        {opts->stdin_once, "--stdin-once"},
        {opts->output_max_size > 0 || opts->output_max_files > 0, "--output-max-size"},
        {opts->hostname != NULL, "--hostname"},
        {opts->netns != NULL, "--netns"},
        {opts->rootfs_lower != NULL || opts->rootfs_dir != NULL, "--rootfs-lower"},
        {opts->n_binds > 0, "--bind"},
        {opts->masked_paths[0] != NULL, "--masked-path"},
        {opts->readonly_paths[0] != NULL, "--readonly-path"},
        {opts->cgroupns, "--cgroupns"},
        {!opts->namespaces, "--no-namespaces"},
        {opts->sysctls[0] != NULL, "--sysctl"},
        {opts->read_only_root, "--read-only-root"},
    };
    for (size_t i = 0; i < sizeof launch_only / sizeof launch_only[0]; i++)
        if (launch_only[i].given)
            usage_error("not an option of --exec-in:", launch_only[i].option);
    for (int kind = 0; kind < NS_KINDS; kind++)
        if (opts->ns[kind].path != NULL || opts->ns[kind].host)
            usage_error("not an option of --exec-in:", "--ns");
    if (opts->exec_start_time == NULL)
        usage_error("--exec-in needs --exec-start-time", NULL);
}

/* What --uid, --ns, --sysctl and --read-only-root need. */
static void check_container_options(const struct options *opts)
{
    int given = opts->identity_given;
    if (given != 0 && (given & (GIVEN_UID | GIVEN_GID)) != (GIVEN_UID | GIVEN_GID))
        usage_error("--uid and --gid go together (and --groups with them)", NULL);
    int joins = 0;
    for (int kind = 0; kind < NS_KINDS; kind++)
        joins |= opts->ns[kind].path != NULL || opts->ns[kind].host;
    if ((joins || opts->sysctls[0] != NULL) && !opts->namespaces)
        usage_error("--ns and --sysctl need namespaces", NULL);
    if (opts->read_only_root && opts->rootfs_lower == NULL)
        usage_error("--read-only-root needs --rootfs-lower", NULL);
    if (opts->ns[NS_USER].host)
        usage_error("--ns user=host: the host's user namespace is the default", NULL);
    if (opts->userns_size > 0 && (opts->ns[NS_USER].path != NULL || !opts->namespaces))
        usage_error("--userns needs namespaces, and no --ns user=", NULL);
    /* A pid namespace made inside the new user namespace is its own: one joined or the host's
     * would not be (its /proc could not be mounted). */
    if (opts->userns_size > 0 && (opts->ns[NS_PID].path != NULL || opts->ns[NS_PID].host))
        usage_error("--userns needs a pid namespace of the container's own", NULL);
}

static void check_options(const struct options *opts)
{
    if (exec_mode)
        check_exec_options(opts);
    else if (opts->exec_in != NULL || opts->exec_start_time != NULL)
        usage_error("--exec-in must be the first option, with --exec-start-time", NULL);
    else if ((opts->tty || opts->keep_stdin) && opts->attach_socket == NULL)
        usage_error("--stdin and --tty need --attach-socket", NULL);
    else if (opts->stdin_once && !opts->keep_stdin)
        usage_error("--stdin-once needs --stdin", NULL);
    else if (opts->status_file == NULL || opts->sandbox == NULL)
        usage_error("--status-file and --sandbox are required", NULL);
    for (size_t i = 0; i < opts->n_binds; i++)
        if (opts->binds[i].target == NULL)
            usage_error("every --bind needs its --to", NULL);
    if ((opts->rootfs_lower == NULL) != (opts->rootfs_dir == NULL))
        usage_error("--rootfs-lower and --rootfs-dir go together", NULL);
    int mounts = opts->rootfs_lower != NULL || opts->n_binds > 0 || opts->cgroupns ||
                 opts->masked_paths[0] != NULL || opts->readonly_paths[0] != NULL;
    if (mounts && !opts->namespaces)
        usage_error("--rootfs-lower, --bind and the confinement's paths need namespaces", NULL);
    if (opts->cgroupns && opts->rootfs_lower == NULL)
        usage_error("--cgroupns needs --rootfs-lower", NULL);
    if (!opts->privileged && (!opts->have_capabilities || !opts->have_seccomp))
        usage_error("--capabilities and --seccomp are required unless --privileged", NULL);
    check_container_options(opts);
    if ((opts->output_max_size > 0) != (opts->output_max_files > 0))
        usage_error("--output-max-size (above 0) and --output-max-files go together", NULL);
    if (opts->argv[0] == NULL)
        usage_error("no command after --", NULL);
}

/* Parses the configuration text into opts; every array is on the heap, sized by what came. */
static void parse_config(char *text, size_t size, struct options *opts)
{
    struct cursor start = {text, text + size};
    struct lists sizes;
    memset(opts, 0, sizeof *opts);
    opts->namespaces = 1;
    walk_options(start, opts, &sizes, 0);
    memset(opts, 0, sizeof *opts);
    opts->namespaces = 1;
    opts->env = new_list(sizes.count[L_ENV]);
    opts->cgroup_procs = new_list(sizes.count[L_CGROUPS]);
    opts->masked_paths = new_list(sizes.count[L_MASKED]);
    opts->readonly_paths = new_list(sizes.count[L_READONLY]);
    opts->sysctls = new_list(sizes.count[L_SYSCTLS]);
    opts->binds = allocate(sizes.count[L_BINDS] + 1, sizeof *opts->binds);
    config_memory.lists[config_memory.n_lists++] = opts->binds;
    opts->n_binds = sizes.count[L_BINDS];
    struct cursor at = walk_options(start, opts, &sizes, 1);
    size_t n_argv = 0;
    for (struct cursor count = at; next_string(&count) != NULL;)
        n_argv++;
    opts->argv = new_list(n_argv);
    for (size_t i = 0; i < n_argv; i++)
        opts->argv[i] = next_string(&at);
    int have_path = 0;
    for (size_t i = 0; i < sizes.count[L_ENV]; i++)
        have_path |= strncmp(opts->env[i], "PATH=", 5) == 0;
    if (!have_path)
        opts->env[sizes.count[L_ENV]] = (char *)DEFAULT_PATH;
    check_options(opts);
}

/* argv is only `--config-fd FD`: nothing of the workload ever appears on a command line. */
static int config_fd_of(int argc, char **argv)
{
    char *end;
    if (argc != 3 || strcmp(argv[1], "--config-fd") != 0)
        usage_error("usage: containerizer-supervisor --config-fd FD", NULL);
    long fd = strtol(argv[2], &end, 10);
    if (argv[2][0] == '\0' || *end != '\0' || fd < 0 || fd > INT_MAX)
        usage_error("--config-fd needs a file descriptor, got", argv[2]);
    return (int)fd;
}

static int read_last_capability(void)
{
    char text[16];
    int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return -1;
    text[n] = '\0';
    int last = atoi(text);
    return last > 0 && last < 64 ? last : -1;
}

/* Field 22 of /proc/PID/stat (start time in clock ticks since boot), or 0 if unreadable. */
static unsigned long long start_time(pid_t pid)
{
    char path[64], buf[1024];
    ssize_t n;
    int fd, field;
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* comm may hold spaces and parentheses */
    if (p == NULL)
        return 0;
    /* After ") " comes field 3; skip to field 22. */
    for (field = 2; field < 22 && p != NULL; field++) {
        p = strchr(p + 1, ' ');
    }
    return p ? strtoull(p + 1, NULL, 10) : 0;
}

/* --- the child: everything between fork and exec ------------------------------------------- */

/* Tells the supervisor which step failed (through the close-on-exec pipe) and exits. */
static void child_fail(int errpipe, const char *step, const char *detail, const char *reason)
{
    const int err = errno; /* exec's, when step is "exec" */
    char msg[512];
    int n;
    if (detail != NULL)
        n = snprintf(msg, sizeof msg, "%s: %s: %s", step, detail, reason);
    else
        n = snprintf(msg, sizeof msg, "%s: %s", step, reason);
    if (errpipe < 0) /* exec mode: nobody reads a pipe, the command's caller is told directly */
        report_failure(msg, strcmp(step, "exec") == 0 && err == ENOENT ? EXEC_NOT_FOUND
                                                                       : EXEC_CANNOT_RUN);
    if (n > 0)
        (void)write_all(errpipe, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
    _exit(127);
}

static void join_cgroups(int errpipe, char **cgroup_procs)
{
    for (; *cgroup_procs != NULL; cgroup_procs++) {
        int fd = open(*cgroup_procs, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write_all(fd, "0", 1) < 0)
            child_fail(errpipe, "cgroup", *cgroup_procs, error_text(errno));
        close(fd);
    }
}

static void join_netns(int errpipe, const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNET) < 0)
        child_fail(errpipe, "netns", path, error_text(errno));
    close(fd);
}

/* --- the container's root filesystem -------------------------------------------------------- */

/* root + suffix into path (PATH_MAX); a path too long fails the launch instead of truncating. */
static void join_path(int errpipe, char *path, const char *root, const char *suffix)
{
    int n = snprintf(path, PATH_MAX, "%s%s", root, suffix);
    if (n < 0 || n >= PATH_MAX)
        child_fail(errpipe, "rootfs", suffix, "path too long");
}

static void mount_or_fail(int errpipe, const char *source, const char *target, const char *type,
                          unsigned long flags, const char *data)
{
    if (mount(source, target, type, flags, data) < 0)
        child_fail(errpipe, "rootfs", target, error_text(errno));
}

/* Creates every missing directory of `path` (absolute), and the last component as a directory
 * or, when as_file, as an empty file: the mount point for a bind of the same kind. */
static void make_mount_point(int errpipe, char *path, int as_file)
{
    for (char *slash = strchr(path + 1, '/'); slash != NULL; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
            child_fail(errpipe, "rootfs", path, error_text(errno));
        *slash = '/';
    }
    int fd = as_file ? open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644) : -1;
    if (as_file ? fd < 0 : mkdir(path, 0755) < 0 && errno != EEXIST)
        child_fail(errpipe, "rootfs", path, error_text(errno));
    if (fd >= 0)
        close(fd);
}

static void bind_into(int errpipe, const char *root, const char *source, const char *target,
                      int read_only)
{
    char path[PATH_MAX];
    struct stat info;
    if (stat(source, &info) < 0)
        child_fail(errpipe, "bind", source, error_text(errno));
    join_path(errpipe, path, root, target);
    make_mount_point(errpipe, path, !S_ISDIR(info.st_mode));
    mount_or_fail(errpipe, source, path, NULL, MS_BIND | MS_REC, NULL);
    if (read_only) /* a bind takes MS_RDONLY only on a remount */
        mount_or_fail(errpipe, NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL);
}

/* A tmpfs /dev with the host's harmless character devices bound in, a private devpts and shm. */
static void populate_dev(int errpipe, const char *root)
{
    static const char *const devices[] = {"null", "zero", "full", "random", "urandom", "tty"};
    char path[PATH_MAX];
    join_path(errpipe, path, root, "/dev");
    make_mount_point(errpipe, path, 0);
    mount_or_fail(errpipe, "tmpfs", path, "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=755,size=64k");
    for (size_t i = 0; i < sizeof devices / sizeof devices[0]; i++) {
        char device[32];
        snprintf(device, sizeof device, "/dev/%s", devices[i]);
        bind_into(errpipe, root, device, device, 0); /* the host's node onto its path inside */
    }
    join_path(errpipe, path, root, "/dev/pts");
    make_mount_point(errpipe, path, 0);
    mount_or_fail(errpipe, "devpts", path, "devpts", MS_NOSUID | MS_NOEXEC,
                  "newinstance,ptmxmode=0666,mode=0620");
    join_path(errpipe, path, root, "/dev/shm");
    make_mount_point(errpipe, path, 0);
    mount_or_fail(errpipe, "shm", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=65536k");
    static const char *const links[][2] = {{"/proc/self/fd", "fd"},     {"/proc/self/fd/0", "stdin"},
                                           {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"},
                                           {"pts/ptmx", "ptmx"}};
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) {
        char inside[32];
        snprintf(inside, sizeof inside, "/dev/%s", links[i][1]);
        join_path(errpipe, path, root, inside);
        if (symlink(links[i][0], path) < 0)
            child_fail(errpipe, "rootfs", path, error_text(errno));
    }
}

/* A cgroup v1 mount's super options without what must not (rw: we mount read-only) or may not
 * (release_agent, refused inside a cgroup namespace) be given again: its controllers, name=. */
static void cgroup_mount_data(char *options, char *data, size_t size)
{
    size_t used = 0;
    data[0] = '\0';
    for (char *save = NULL, *option = strtok_r(options, ",", &save); option != NULL;
         option = strtok_r(NULL, ",", &save)) {
        if (strcmp(option, "rw") == 0 || strcmp(option, "ro") == 0 ||
            strncmp(option, "release_agent=", 14) == 0)
            continue;
        int n = snprintf(data + used, size - used, "%s%s", used ? "," : "", option);
        if (n < 0 || (size_t)n >= size - used)
            return;
        used += (size_t)n;
    }
}

/* One of the host's cgroup hierarchies, read-only under dir (the namespace's view of it). */
static void mount_hierarchy(int errpipe, const char *dir, const char *fstype, char *options)
{
    char data[256];
    unsigned long flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC;
    if (mkdir(dir, 0555) < 0 && errno != EEXIST)
        child_fail(errpipe, "cgroupfs", dir, error_text(errno));
    if (strcmp(fstype, "cgroup2") == 0) {
        if (mount("cgroup2", dir, "cgroup2", flags, NULL) < 0)
            child_fail(errpipe, "cgroupfs", dir, error_text(errno));
        return;
    }
    cgroup_mount_data(options, data, sizeof data);
    if (mount("cgroup", dir, "cgroup", flags, data) < 0)
        child_fail(errpipe, "cgroupfs", dir, error_text(errno));
}

/* Splits a /proc/self/mountinfo line into its mount point, fstype and super options. */
static int mountinfo_fields(char *line, char **point, char **fstype, char **options)
{
    char *save = NULL, *field = strtok_r(line, " \n", &save);
    for (int i = 0; field != NULL && i < 4; i++)
        field = strtok_r(NULL, " \n", &save);
    *point = field;
    while (field != NULL && strcmp(field, "-") != 0)
        field = strtok_r(NULL, " \n", &save);
    *fstype = strtok_r(NULL, " \n", &save);
    (void)strtok_r(NULL, " \n", &save); /* source */
    *options = strtok_r(NULL, " \n", &save);
    return *point != NULL && *fstype != NULL && *options != NULL;
}

/* root/sys/fs/cgroup as the container sees it: a read-only tmpfs with each host hierarchy
 * mounted read-only from inside the cgroup namespace (or the unified hierarchy itself). */
static void mount_cgroupfs(int errpipe, const char *root)
{
    char target[PATH_MAX], dir[PATH_MAX];
    const size_t prefix = sizeof CGROUP_MOUNTS; /* "/sys/fs/cgroup/" */
    char *line = NULL, *point, *fstype, *options;
    size_t capacity = 0;
    FILE *mounts = fopen("/proc/self/mountinfo", "re");
    if (mounts == NULL)
        child_fail(errpipe, "cgroupfs", "/proc/self/mountinfo", error_text(errno));
    join_path(errpipe, target, root, CGROUP_MOUNTS);
    int tmpfs = 0;
    while (getline(&line, &capacity, mounts) > 0) {
        if (!mountinfo_fields(line, &point, &fstype, &options) || strncmp(fstype, "cgroup", 6))
            continue;
        if (strcmp(point, CGROUP_MOUNTS) == 0 && strcmp(fstype, "cgroup2") == 0) {
            mount_hierarchy(errpipe, target, fstype, options); /* a cgroup v2 only host */
            break;
        }
        if (strncmp(point, CGROUP_MOUNTS "/", prefix) || strpbrk(point + prefix, "/\\"))
            continue;
        if (!tmpfs++)
            mount_or_fail(errpipe, "tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          "mode=755,size=64k");
        join_path(errpipe, dir, target, point + prefix - 1);
        mount_hierarchy(errpipe, dir, fstype, options);
    }
    free(line);
    fclose(mounts);
    if (tmpfs)
        mount_or_fail(errpipe, NULL, target, NULL,
                      MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755");
}

/* With a user namespace (--userns, or a pod's): the image's layers, each cloned and idmapped
 * before the init may use them, and whether we are in it (see "user namespace" below). */
#define MAX_LOWER_LAYERS 500 /* the overlay's own bound (OVL_MAX_STACK) */
static int userns_lower_trees[MAX_LOWER_LAYERS];
static size_t n_userns_lower_trees;
static int in_user_namespace;

/* --- mount propagation of the binds (see the top of this file) ----------------------------- */

static int binds_propagate(const struct options *opts)
{
    for (size_t i = 0; i < opts->n_binds; i++)
        if (opts->binds[i].propagation != MS_PRIVATE)
            return 1;
    return 0;
}

/* Called right after the mount namespace is made, while the copies of the host's mounts are
 * still peers of theirs: a clone of each rshared bind's source, a peer of it too. */
static void clone_shared_sources(int errpipe, const struct options *opts)
{
    for (size_t i = 0; i < opts->n_binds; i++) {
        struct bind *bind = &opts->binds[i];
        if (bind->propagation != MS_SHARED || bind->tree >= 0)
            continue; /* with --userns every source was taken before the namespace */
        bind->tree = open_tree(AT_FDCWD, bind->source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC |
                                                           AT_RECURSIVE);
        if (bind->tree < 0)
            child_fail(errpipe, "bind", bind->source, error_text(errno));
    }
}

/* The container's mounts: private, or slaves of the host's when a bind propagates, so that host
 * mounts still reach it. Either way nothing the container mounts reaches the host (but through
 * an rshared bind). */
static void isolate_mounts(int errpipe, const struct options *opts)
{
    unsigned long type = binds_propagate(opts) ? MS_SLAVE : MS_PRIVATE;
    if (mount(NULL, "/", NULL, MS_REC | type, NULL) < 0)
        child_fail(errpipe, "mount", type == MS_SLAVE ? "make / a slave" : "make / private",
                   error_text(errno));
}

/* An rshared bind: its source's clone moved into place, still a peer of the host's mount. */
static void attach_tree(int errpipe, const struct bind *bind, char *path)
{
    struct stat info;
    if (fstat(bind->tree, &info) < 0) /* the source's path may be out of a userns's reach */
        child_fail(errpipe, "bind", bind->source, error_text(errno));
    make_mount_point(errpipe, path, !S_ISDIR(info.st_mode));
    if (move_mount(bind->tree, "", AT_FDCWD, path, MOVE_MOUNT_F_EMPTY_PATH) < 0)
        child_fail(errpipe, "bind", path, error_text(errno));
    close(bind->tree);
    if (bind->read_only)
        mount_or_fail(errpipe, NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL);
}

/* Each --bind under root, then its propagation: rshared a peer of its source, rslave a slave
 * of it, any other private. */
static void mount_binds(int errpipe, const char *root, const struct options *opts)
{
    char path[PATH_MAX];
    for (size_t i = 0; i < opts->n_binds; i++) {
        const struct bind *bind = &opts->binds[i];
        join_path(errpipe, path, root, bind->target);
        if (bind->tree >= 0)
            attach_tree(errpipe, bind, path);
        else
            bind_into(errpipe, root, bind->source, bind->target, bind->read_only);
        if (mount(NULL, path, NULL, MS_REC | bind->propagation, NULL) < 0)
            child_fail(errpipe, "bind", path, error_text(errno));
    }
}

/* A user namespace may mount sysfs only over a network namespace it owns, and the container's
 * is the service's (made on the host, with its veth): the host's /sys bound in read-only, as
 * runc does for rootless containers. */
static const struct mount_attr host_sysfs_attr = {
    .attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC};
static int host_sysfs_tree = -1; /* taken while host root: take_host_trees */

static void bind_host_sysfs(int errpipe, const char *path)
{
    if (host_sysfs_tree >= 0) {
        if (move_mount(host_sysfs_tree, "", AT_FDCWD, path, MOVE_MOUNT_F_EMPTY_PATH) < 0)
            child_fail(errpipe, "rootfs", path, error_text(errno));
        close(host_sysfs_tree);
        return;
    }
    struct mount_attr attr = host_sysfs_attr;
    mount_or_fail(errpipe, "/sys", path, NULL, MS_BIND | MS_REC, NULL);
    if (mount_setattr(AT_FDCWD, path, AT_RECURSIVE, &attr, sizeof attr) < 0)
        child_fail(errpipe, "rootfs", path, error_text(errno));
}

/* While host root, for a user namespace of the container's own: /sys alone, read-only, as a
 * fresh sysfs mount has it. Inside, only a recursive bind would do (the host's mounts below
 * /sys come locked), and copying those mounts, to hide them under the cgroup tmpfs, costs
 * more than the rest of the namespace's mounts. */
static void take_host_sysfs(int errpipe)
{
    struct mount_attr attr = host_sysfs_attr;
    host_sysfs_tree = open_tree(AT_FDCWD, "/sys", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (host_sysfs_tree < 0 ||
        mount_setattr(host_sysfs_tree, "", AT_EMPTY_PATH, &attr, sizeof attr) < 0)
        child_fail(errpipe, "rootfs", "/sys", error_text(errno));
}

static void overlay_config(int errpipe, int context, const char *key, const char *value, int fd)
{
    unsigned int command = value != NULL ? FSCONFIG_SET_STRING : FSCONFIG_SET_FD;
    if (fsconfig(context, command, key, value, fd) < 0)
        child_fail(errpipe, "rootfs", value != NULL ? value : key, error_text(errno));
}

/* The overlay of the image's layers (--rootfs-lower, topmost first, colon-separated) under
 * dir/upper, at root, made with the new mount API: one `lowerdir+` per layer, so no option
 * string (a page at most with mount(2)) bounds how many layers an image may have. In a user
 * namespace of its own the host's paths may be out of reach: the layers are the idmapped trees
 * (take_host_trees), handed over as descriptors, the rootfs directory is our cwd, and the
 * overlay keeps its own xattrs in the user.* namespace, which an unprivileged mount may. */
static void mount_overlay(int errpipe, const char *root, const char *dir, const struct options *opts)
{
    char path[PATH_MAX];
    int context = fsopen("overlay", FSOPEN_CLOEXEC);
    if (context < 0)
        child_fail(errpipe, "rootfs", "overlay", error_text(errno));
    if (in_user_namespace) {
        /* Attached first, in our mount namespace (which our user namespace owns): overlayfs
         * clones each layer's mount, and a detached tree is owned by the host's user namespace
         * that made it, out of our capabilities' reach. */
        for (size_t i = 0; i < n_userns_lower_trees; i++) {
            char lower[32];
            snprintf(lower, sizeof lower, "lower%zu", i);
            if ((mkdir(lower, 0755) < 0 && errno != EEXIST) ||
                move_mount(userns_lower_trees[i], "", AT_FDCWD, lower, MOVE_MOUNT_F_EMPTY_PATH) < 0)
                child_fail(errpipe, "rootfs", "idmapped lower layer", error_text(errno));
            close(userns_lower_trees[i]);
            overlay_config(errpipe, context, "lowerdir+", lower, 0);
        }
        if (fsconfig(context, FSCONFIG_SET_FLAG, "userxattr", NULL, 0) < 0)
            child_fail(errpipe, "rootfs", "userxattr", error_text(errno));
    } else {
        char *layers = strdup(opts->rootfs_lower), *rest = NULL;
        if (layers == NULL)
            child_fail(errpipe, "rootfs", opts->rootfs_lower, error_text(errno));
        for (char *layer = strtok_r(layers, ":", &rest); layer; layer = strtok_r(NULL, ":", &rest))
            overlay_config(errpipe, context, "lowerdir+", layer, 0);
        free(layers);
    }
    join_path(errpipe, path, dir, "/upper");
    overlay_config(errpipe, context, "upperdir", path, 0);
    join_path(errpipe, path, dir, "/work");
    overlay_config(errpipe, context, "workdir", path, 0);
    /* No sync of the upper layer when the overlay goes (its last mount namespace ends, before
     * the status is written): that flushed the disk's cache on every image container's exit.
     * The upper layer is the container's scratch, removed with its run directory and never
     * mounted again, so a host crash leaves nothing to keep. A kernel older than 5.10 has no
     * such option: it syncs as before. */
    (void)fsconfig(context, FSCONFIG_SET_FLAG, "volatile", NULL, 0);
    if (fsconfig(context, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0)
        child_fail(errpipe, "rootfs", "overlay", error_text(errno));
    int mounted = fsmount(context, FSMOUNT_CLOEXEC, 0);
    if (mounted < 0 || move_mount(mounted, "", AT_FDCWD, root, MOVE_MOUNT_F_EMPTY_PATH) < 0)
        child_fail(errpipe, "rootfs", root, error_text(errno));
    close(mounted);
    close(context);
}

/* Mounts the overlay, /proc, /dev, /sys and the binds under rootfs_dir/merged, then makes it /. */
static void enter_rootfs(int errpipe, const struct options *opts)
{
    char root[PATH_MAX], path[PATH_MAX];
    const char *dir = in_user_namespace ? "." : opts->rootfs_dir;
    join_path(errpipe, root, dir, "/merged");
    mount_overlay(errpipe, root, dir, opts);
    join_path(errpipe, path, root, "/proc");
    make_mount_point(errpipe, path, 0);
    mount_or_fail(errpipe, "proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    populate_dev(errpipe, root);
    join_path(errpipe, path, root, "/sys");
    make_mount_point(errpipe, path, 0);
    if (host_sysfs_tree >= 0) /* a user namespace may not mount sysfs: see take_host_sysfs */
        bind_host_sysfs(errpipe, path);
    else if (mount("sysfs", path, "sysfs",
                   (opts->privileged ? 0 : MS_RDONLY) | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   NULL) < 0) {
        if (errno != EPERM || !in_user_namespace)
            child_fail(errpipe, "rootfs", path, error_text(errno));
        bind_host_sysfs(errpipe, path);
    }
    if (opts->cgroupns)
        mount_cgroupfs(errpipe, root);
    mount_binds(errpipe, root, opts);
    if (opts->read_only_root) /* the overlay alone: every mount on it keeps its own flags */
        mount_or_fail(errpipe, NULL, root, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL);
    /* pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only ours. */
    if (chdir(root) < 0 || syscall(SYS_pivot_root, ".", ".") < 0 || umount2(".", MNT_DETACH) < 0 ||
        chdir("/") < 0)
        child_fail(errpipe, "pivot_root", root, error_text(errno));
}

/* Hides each masked path (a file under /dev/null, a directory under an empty read-only tmpfs)
 * and makes each read-only path read-only; a path this kernel does not have is skipped. */
/* A mount cannot sit on a symlink: masking one would hide its target instead (in an image
 * whose applets all link to /bin/busybox, the shell itself). The container's own writable layer
 * gets an empty file in its place, before anything of the container runs; a read-only root
 * keeps the link, and its target is masked. */
static void unlink_masked_symlink(const char *path)
{
    struct stat info;
    if (lstat(path, &info) < 0 || !S_ISLNK(info.st_mode) || unlink(path) < 0)
        return;
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0);
    if (fd >= 0)
        close(fd);
}

static void confine_paths(int errpipe, const struct options *opts)
{
    const unsigned long locked = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC;
    struct stat info;
    for (char **path = opts->masked_paths; *path != NULL; path++) {
        unlink_masked_symlink(*path);
        if (stat(*path, &info) < 0) {
            if (errno == ENOENT || errno == ENOTDIR)
                continue;
            child_fail(errpipe, "masked-path", *path, error_text(errno));
        }
        if (S_ISDIR(info.st_mode) ? mount("tmpfs", *path, "tmpfs", locked, "mode=555,size=4k") < 0
                                  : mount("/dev/null", *path, NULL, MS_BIND, NULL) < 0)
            child_fail(errpipe, "masked-path", *path, error_text(errno));
    }
    for (char **path = opts->readonly_paths; *path != NULL; path++) {
        if (mount(*path, *path, NULL, MS_BIND | MS_REC, NULL) < 0) {
            if (errno == ENOENT || errno == ENOTDIR)
                continue;
            child_fail(errpipe, "readonly-path", *path, error_text(errno));
        }
        if (mount(NULL, *path, NULL, MS_BIND | MS_REMOUNT | locked, NULL) < 0)
            child_fail(errpipe, "readonly-path", *path, error_text(errno));
    }
}

/* --- namespaces joined (a pod's) or shared with the host ------------------------------------ */

static int namespace_fds[NS_KINDS] = {-1, -1, -1, -1};

/* The supervisor opens the namespaces to join before any namespace changes: the paths are the
 * host's. */
static void open_namespaces(const struct options *opts)
{
    for (int kind = 0; kind < NS_KINDS; kind++) {
        const char *path = opts->ns[kind].path;
        if (path != NULL && (namespace_fds[kind] = open(path, O_RDONLY | O_CLOEXEC)) < 0)
            fail(ns_kinds[kind].step, path, errno);
    }
}

static void close_namespaces(void)
{
    for (int kind = 0; kind < NS_KINDS; kind++)
        if (namespace_fds[kind] >= 0) {
            close(namespace_fds[kind]);
            namespace_fds[kind] = -1;
        }
}

/* Whether the container has a `kind` namespace of its own (not a pod's, not the host's). */
static int own_namespace(const struct options *opts, int kind)
{
    return opts->ns[kind].path == NULL && !opts->ns[kind].host;
}

/* Whether the init's new pid namespace is made by the child, inside the user namespace that
 * must own it (for /proc to be mountable there): with --userns, or in a pod's user namespace
 * with a pid namespace of the container's own. The init's host pid then comes through
 * userns_pid_pipe. */
static int pid_namespace_in_user_namespace(const struct options *opts)
{
    return opts->namespaces &&
           (opts->userns_size > 0 || (opts->ns[NS_USER].path != NULL && own_namespace(opts, NS_PID)));
}

/* The pid namespace the supervisor's children are born in: a new one, a pod's (setns() with
 * CLONE_NEWPID refuses any other kind of file), or with `host` the supervisor's own. */
static void choose_pid_namespace(const struct options *opts)
{
    const char *path = opts->ns[NS_PID].path;
    if (!opts->namespaces || opts->ns[NS_PID].host || pid_namespace_in_user_namespace(opts))
        return; /* the child makes it, in the user namespace */
    if (path != NULL ? setns(namespace_fds[NS_PID], CLONE_NEWPID) < 0 : unshare(CLONE_NEWPID) < 0)
        fail("pidns", path, errno);
}

/* The child joins a pod's ipc and uts namespaces, each setns() checking the file's kind. */
static void join_namespaces(int errpipe, const struct options *opts)
{
    for (int kind = NS_IPC; kind <= NS_UTS; kind++)
        if (namespace_fds[kind] >= 0 && setns(namespace_fds[kind], ns_kinds[kind].flag) < 0)
            child_fail(errpipe, ns_kinds[kind].step, opts->ns[kind].path, error_text(errno));
    close_namespaces();
}

/* An init that is not pid 1 of a namespace of its own would lose the workload's orphans to the
 * namespace's pid 1 (a pod's holder, the host's init): as a subreaper it reaps them itself. */
static void reap_orphans(int errpipe, const struct options *opts)
{
    if (!own_namespace(opts, NS_PID) && prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        child_fail(errpipe, "init", "child subreaper", error_text(errno));
}

/* --- user namespace (--userns, or a pod's: --ns user=PATH) -------------------------------- */

/* Container root is an unprivileged host uid. The user namespace must own the container's
 * other new namespaces (mount, pid, uts, ipc, cgroup), so it is made before them: the init is
 * cloned into a new user namespace and a pid namespace that namespace owns, by a child of the
 * supervisor that is still host root. That child joined the cgroups, opened the workload's
 * stdio and joined the (host-made) network namespace first, took every bind's source and the
 * image's rootfs as detached mount trees (inside, the paths may be out of reach), then writes
 * the new namespace's uid and gid maps, idmaps the rootfs tree through it (so the image's files,
 * owned by host ids from 0, are owned by the container's ids from 0), tells the supervisor the
 * init's pid and exits: the init, reparented to the supervisor (a child subreaper), goes on. */

static int userns_pid_pipe = -1; /* to the supervisor: the init's host pid */
static int sandbox_fd; /* defined with the workload's stdio, below */

/* After entering a user namespace we are still host root by uid, which the namespace does not
 * map: become its root, with none of the host's groups. The capabilities there are all ours. */
static void become_namespace_root(int errpipe)
{
    if (setgroups(0, NULL) < 0 || setresgid(0, 0, 0) < 0 || setresuid(0, 0, 0) < 0)
        child_fail(errpipe, "userns", "become its root", error_text(errno));
}


static void write_id_map(int errpipe, pid_t pid, const char *name, unsigned long start,
                         unsigned long size)
{
    char path[64], map[64];
    snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, name);
    int n = snprintf(map, sizeof map, "0 %lu %lu\n", start, size);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write_all(fd, map, (size_t)n) < 0)
        child_fail(errpipe, "userns", name, error_text(errno));
    close(fd);
}

/* While host root: each bind's source as a detached clone, the image's rootfs likewise, and
 * the rootfs directory as our cwd (the overlay names its directories relative to it). */
static void take_host_trees(int errpipe, const struct options *opts)
{
    for (size_t i = 0; i < opts->n_binds; i++) {
        struct bind *bind = &opts->binds[i];
        bind->tree = open_tree(AT_FDCWD, bind->source,
                               OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
        if (bind->tree < 0)
            child_fail(errpipe, "bind", bind->source, error_text(errno));
    }
    if (opts->rootfs_lower == NULL) {
        /* Without an image the workload starts in its sandbox, whose host path the namespace's
         * root may not be able to walk (a parent 0700): entered now, by our descriptor, so the
         * mount namespace made next carries it over as the cwd. */
        if (opts->cwd != NULL && strcmp(opts->cwd, opts->sandbox) == 0 && fchdir(sandbox_fd) < 0)
            child_fail(errpipe, "cwd", opts->cwd, error_text(errno));
        return;
    }
    char *layers = strdup(opts->rootfs_lower), *rest = NULL;
    if (layers == NULL)
        child_fail(errpipe, "rootfs", opts->rootfs_lower, error_text(errno));
    for (char *layer = strtok_r(layers, ":", &rest); layer; layer = strtok_r(NULL, ":", &rest)) {
        if (n_userns_lower_trees == MAX_LOWER_LAYERS)
            child_fail(errpipe, "rootfs", opts->rootfs_lower, "more layers than an overlay stacks");
        int tree = open_tree(AT_FDCWD, layer, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
        if (tree < 0)
            child_fail(errpipe, "rootfs", layer, error_text(errno));
        userns_lower_trees[n_userns_lower_trees++] = tree;
    }
    free(layers);
    if (opts->userns_size > 0)
        take_host_sysfs(errpipe);
    if (chdir(opts->rootfs_dir) < 0)
        child_fail(errpipe, "rootfs", opts->rootfs_dir, error_text(errno));
}

static void idmap_lower(int errpipe, int userns)
{
    struct mount_attr attr = {.attr_set = MOUNT_ATTR_IDMAP, .userns_fd = (uint64_t)userns};
    if (userns < 0)
        child_fail(errpipe, "rootfs", "idmapped lower layer", error_text(errno));
    for (size_t i = 0; i < n_userns_lower_trees; i++)
        if (mount_setattr(userns_lower_trees[i], "", AT_EMPTY_PATH, &attr, sizeof attr) < 0)
            child_fail(errpipe, "rootfs", "idmapped lower layer", error_text(errno));
}

/* A pod's user namespace: after the host's network namespace and before the pod's ipc and uts
 * namespaces, which it owns (joining those takes its capabilities, joining the former ours). */
static void join_user_namespace(int errpipe, const struct options *opts)
{
    take_host_trees(errpipe, opts);
    if (n_userns_lower_trees > 0)
        idmap_lower(errpipe, namespace_fds[NS_USER]);
    if (setns(namespace_fds[NS_USER], CLONE_NEWUSER) < 0)
        child_fail(errpipe, "userns", opts->ns[NS_USER].path, error_text(errno));
    in_user_namespace = 1;
    become_namespace_root(errpipe);
}

/* In a pod's user namespace, with a pid namespace of the container's own: that namespace made
 * now, so the user namespace owns it, and the init forked into it. Returns in the init only;
 * the caller (the supervisor's child) tells the supervisor the init's pid and exits. */
static void fork_into_pid_namespace(int errpipe)
{
    if (unshare(CLONE_NEWPID) < 0)
        child_fail(errpipe, "pidns", "new", error_text(errno));
    pid_t pid = fork();
    if (pid < 0)
        child_fail(errpipe, "pidns", "fork", error_text(errno));
    if (pid == 0) {
        close(userns_pid_pipe);
        return;
    }
    if (write_all(userns_pid_pipe, (const char *)&pid, sizeof pid) < 0)
        child_fail(errpipe, "userns", "start the init", error_text(errno));
    _exit(0);
}

/* Returns in the cloned init only; the caller (the supervisor's child) exits here. */
static void clone_into_user_namespace(int errpipe, const struct options *opts)
{
    int go[2];
    char byte;
    take_host_trees(errpipe, opts);
    if (pipe2(go, O_CLOEXEC) < 0)
        child_fail(errpipe, "userns", "pipe", error_text(errno));
    /* one clone: the kernel makes the user namespace first, so it owns the pid namespace */
    pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWUSER | CLONE_NEWPID | SIGCHLD, NULL, NULL,
                               NULL, NULL);
    if (pid < 0)
        child_fail(errpipe, "userns", "clone", error_text(errno));
    if (pid == 0) {
        close(go[1]);
        close(userns_pid_pipe);
        if (read(go[0], &byte, 1) != 1)
            _exit(127); /* our parent failed, and told the supervisor why */
        close(go[0]);
        in_user_namespace = 1;
        become_namespace_root(errpipe);
        return;
    }
    close(go[0]);
    write_id_map(errpipe, pid, "uid_map", opts->userns_uid, opts->userns_size);
    write_id_map(errpipe, pid, "gid_map", opts->userns_gid, opts->userns_size);
    if (n_userns_lower_trees > 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/ns/user", (int)pid);
        int userns = open(path, O_RDONLY | O_CLOEXEC);
        idmap_lower(errpipe, userns);
        close(userns);
    }
    if (write_all(userns_pid_pipe, (const char *)&pid, sizeof pid) < 0 ||
        write_all(go[1], "g", 1) < 0)
        child_fail(errpipe, "userns", "start the init", error_text(errno));
    _exit(0);
}

/* --- kernel settings of the container's namespaces (--sysctl) ------------------------------ */

/* Each KEY=VALUE into /proc/sys/KEY of the container's /proc: what a key there reads and
 * writes is the opener's namespace (its network, its ipc). Before confine_paths, which makes
 * /proc/sys read-only. */
static void write_sysctls(int errpipe, const struct options *opts)
{
    char path[PATH_MAX];
    const size_t prefix = sizeof "/proc/sys/" - 1;
    for (char **setting = opts->sysctls; *setting != NULL; setting++) {
        const char *equals = strchr(*setting, '=');
        int n = snprintf(path, sizeof path, "/proc/sys/%.*s", (int)(equals - *setting), *setting);
        if (n < 0 || n >= (int)sizeof path)
            child_fail(errpipe, "sysctl", *setting, "key too long");
        for (char *c = path + prefix; *c != '\0'; c++)
            *c = *c == '.' ? '/' : *c;
        int fd = open(path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 || write_all(fd, equals + 1, strlen(equals + 1)) < 0)
            child_fail(errpipe, "sysctl", *setting, error_text(errno));
        close(fd);
    }
}

static void enter_namespaces(int errpipe, const struct options *opts)
{
    join_namespaces(errpipe, opts);
    /* The cgroup namespace comes after join_cgroups: the container's cgroups are its root. */
    int own = CLONE_NEWNS | (own_namespace(opts, NS_UTS) ? CLONE_NEWUTS : 0) |
              (own_namespace(opts, NS_IPC) ? CLONE_NEWIPC : 0) |
              (opts->cgroupns ? CLONE_NEWCGROUP : 0);
    if (unshare(own) < 0)
        child_fail(errpipe, "namespaces", NULL, error_text(errno));
    clone_shared_sources(errpipe, opts);
    isolate_mounts(errpipe, opts);
    if (opts->rootfs_lower != NULL)
        enter_rootfs(errpipe, opts);
    else {
        mount_binds(errpipe, "", opts);
        if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
            child_fail(errpipe, "proc", "/proc", error_text(errno));
    }
    write_sysctls(errpipe, opts);
    confine_paths(errpipe, opts);
    if (opts->hostname != NULL && own_namespace(opts, NS_UTS)) {
        size_t len = strlen(opts->hostname);
        if (sethostname(opts->hostname, len > HOSTNAME_MAX_LEN ? HOSTNAME_MAX_LEN : len) < 0)
            child_fail(errpipe, "hostname", NULL, error_text(errno));
    }
}

/* --- attach (defined below, "attach socket"): the CRI log's output also goes to clients --- */

static void attach_broadcast(int stream, const char *data, size_t length);
static int attach_poll_fds(struct pollfd *fds);
static void attach_serve(const struct pollfd *fds, int count);
static void attach_finish(void);
static int write_sandbox_output(int stream, const char *data, size_t length);
#define ATTACH_POLL_MAX 10 /* the listening socket, the workload's stdin, 8 clients */

/* --- CRI log mode (--log-file) ------------------------------------------------------------ */

/* The kubelet reads a container's output from one file of records
 *     <RFC3339Nano time, UTC> <stdout|stderr> <F|P> <content>\n
 * F ends a line; P is a piece of a line longer than LOG_LINE_MAX. The workload writes into two
 * pipes; the supervisor reads them, stamps each read with the time it was read and appends the
 * records. Each stream has one fixed buffer, so the supervisor's memory never grows with what a
 * workload writes. */
#define LOG_LINE_MAX (16u << 10)
#define LOG_READ_MAX (16u << 10)
#define LOG_DRAIN_FALLBACK (1u << 20) /* a pipe's size when F_GETPIPE_SZ cannot tell it */
#define LOG_POLL_FALLBACK_MS 100      /* how often the exit is looked for without a signalfd */

struct log_stream {
    int fd; /* the pipe's read end, non-blocking; -1 after EOF */
    const char *name;
    size_t used;
    char buffer[LOG_LINE_MAX + LOG_READ_MAX]; /* no more than LOG_LINE_MAX stay between reads */
};

static struct {
    int fd;              /* the log file; -1 without --log-file */
    char path[PATH_MAX]; /* to reopen it: the configuration is freed once the workload runs */
    int write_ends[2];   /* the workload's stdout and stderr */
    struct log_stream streams[2];
} cri_log = {.fd = -1,
             .write_ends = {-1, -1},
             .streams = {{.fd = -1, .name = "stdout"}, {.fd = -1, .name = "stderr"}}};

/* The log file, appended to: never through a symlink, never a file linked from elsewhere, as
 * the sandbox's files. O_NONBLOCK makes a FIFO at the path fail (ENXIO) instead of hanging us;
 * on a regular file it changes nothing. Returns the fd, or -1 with *reason set. */
static int open_log_file(const char *path, const char **reason)
{
    struct stat info;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0640);
    if (fd < 0) {
        *reason = error_text(errno);
        return -1;
    }
    if (fstat(fd, &info) < 0 || !S_ISREG(info.st_mode) || info.st_nlink != 1) {
        close(fd);
        *reason = "not a regular file of its own";
        return -1;
    }
    return fd;
}

/* Opens the log file and makes the two pipes, in the supervisor before the first fork (so the
 * path is the host's). Only the read ends are non-blocking: a workload's writes block as usual. */
static void prepare_cri_log(const char *path)
{
    const char *reason;
    if (path[0] != '/' || strlen(path) >= sizeof cri_log.path)
        usage_error("--log-file needs an absolute path, got", path);
    strcpy(cri_log.path, path);
    cri_log.fd = open_log_file(path, &reason);
    if (cri_log.fd < 0)
        fail_because("log-file", path, reason);
    for (int i = 0; i < 2; i++) {
        int ends[2];
        if (pipe2(ends, O_CLOEXEC) < 0 || fcntl(ends[0], F_SETFL, O_NONBLOCK) < 0)
            fail("pipe", cri_log.streams[i].name, errno);
        cri_log.streams[i].fd = ends[0];
        cri_log.write_ends[i] = ends[1];
    }
}

/* In the child: stdout and stderr become the pipes' write ends, and nothing else of the log stays
 * (the init never execs; a read end kept there would spare the writers their SIGPIPE once the
 * supervisor is gone, and leave them blocked on a full pipe instead). */
static void attach_log_pipes(int errpipe)
{
    for (int i = 0; i < 2; i++) {
        if (dup2(cri_log.write_ends[i], STDOUT_FILENO + i) < 0)
            child_fail(errpipe, cri_log.streams[i].name, "log pipe", error_text(errno));
        close(cri_log.write_ends[i]);
        close(cri_log.streams[i].fd);
    }
    close(cri_log.fd);
}

/* In the supervisor once the child runs: its copies alone keep the pipes open. */
static void close_log_write_ends(void)
{
    for (int i = 0; i < 2; i++)
        if (cri_log.write_ends[i] >= 0)
            close(cri_log.write_ends[i]);
}

/* Appends all the parts, resuming after a short write. A record the file refuses (a full disk)
 * is dropped: a workload must not stop because its log cannot be written. */
static void append_parts(int fd, struct iovec *parts, int count)
{
    while (count > 0) {
        ssize_t n = writev(fd, parts, count);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        for (; count > 0 && (size_t)n >= parts->iov_len; parts++, count--)
            n -= (ssize_t)parts->iov_len;
        if (count > 0) {
            parts->iov_base = (char *)parts->iov_base + n;
            parts->iov_len -= (size_t)n;
        }
    }
}

static void write_record(const struct log_stream *stream, char tag, const char *content,
                         size_t length, const struct timespec *when)
{
    char prefix[96];
    struct tm utc;
    gmtime_r(&when->tv_sec, &utc);
    size_t n = strftime(prefix, sizeof prefix, "%Y-%m-%dT%H:%M:%S", &utc);
    int m = snprintf(prefix + n, sizeof prefix - n, ".%09ldZ %s %c ", when->tv_nsec, stream->name,
                     tag);
    struct iovec parts[3] = {
        {prefix, n + (size_t)m}, {(void *)content, length}, {(void *)"\n", 1}};
    append_parts(cri_log.fd, parts, 3);
}

/* Turns the buffer into records: each complete line an F, and of a line longer than LOG_LINE_MAX
 * each first LOG_LINE_MAX bytes a P. What is left is an unfinished line of at most LOG_LINE_MAX
 * bytes, kept for the next read, or with `at_end` (EOF, the workload ended) written as an F. */
static void emit_records(struct log_stream *stream, const struct timespec *when, int at_end)
{
    size_t start = 0;
    for (;;) {
        const char *line = stream->buffer + start;
        size_t left = stream->used - start;
        const char *newline = memchr(line, '\n', left);
        size_t length = newline != NULL ? (size_t)(newline - line) : left;
        if (length > LOG_LINE_MAX) {
            write_record(stream, 'P', line, LOG_LINE_MAX, when);
            start += LOG_LINE_MAX;
        } else if (newline != NULL) {
            write_record(stream, 'F', line, length, when);
            start += length + 1;
        } else {
            break;
        }
    }
    if (at_end && start < stream->used) {
        write_record(stream, 'F', stream->buffer + start, stream->used - start, when);
        start = stream->used;
    }
    memmove(stream->buffer, stream->buffer + start, stream->used - start);
    stream->used -= start;
}

/* Reads from the stream's pipe until it is empty or `budget` bytes came, writing the records as
 * it goes; at EOF the unfinished line is flushed and the pipe closed. */
static void pump(struct log_stream *stream, size_t budget)
{
    while (stream->fd >= 0 && budget > 0) {
        struct timespec now;
        size_t room = sizeof stream->buffer - stream->used;
        ssize_t n = read(stream->fd, stream->buffer + stream->used, room < budget ? room : budget);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        clock_gettime(CLOCK_REALTIME, &now);
        if (n <= 0) {
            emit_records(stream, &now, 1);
            close(stream->fd);
            stream->fd = -1;
            return;
        }
        int index = (int)(stream - cri_log.streams);
        attach_broadcast(index, stream->buffer + stream->used, (size_t)n);
        budget -= (size_t)n;
        if (write_sandbox_output(index, stream->buffer + stream->used, (size_t)n))
            continue; /* no CRI log: appended as it came, nothing to keep */
        stream->used += (size_t)n;
        emit_records(stream, &now, 0);
    }
}

/* Once the workload has ended, the pipes hold the rest of its output. Orphans in a pid namespace
 * that is not the container's own may keep a write end open and write on, so reading stops when
 * a pipe is empty or has given as much as it can hold, not at EOF. */
static void drain_logs(void)
{
    for (int i = 0; i < 2; i++) {
        struct log_stream *stream = &cri_log.streams[i];
        struct timespec now;
        if (stream->fd < 0)
            continue;
        int capacity = fcntl(stream->fd, F_GETPIPE_SZ);
        pump(stream, capacity > 0 ? (size_t)capacity : LOG_DRAIN_FALLBACK);
        clock_gettime(CLOCK_REALTIME, &now);
        emit_records(stream, &now, 1);
    }
}

/* SIGCHLD (the child ended) and SIGUSR1 (reopen the log) as a readable fd for poll. SIGUSR1 was
 * ignored so far; blocked first, then given back its default, it can no longer kill us. */
static int log_signals(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
        return -1;
    (void)signal(SIGUSR1, SIG_DFL);
    return signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
}

/* SIGUSR1: the kubelet renamed the log (rotation) and wants a new file at the path. If that
 * cannot be opened, the records keep going to the old file rather than nowhere. */
static void reopen_log_file(void)
{
    const char *reason;
    int fd = open_log_file(cri_log.path, &reason);
    if (fd >= 0) {
        if (cri_log.fd >= 0)
            close(cri_log.fd);
        cri_log.fd = fd;
    }
}

static void take_log_signals(int sigfd)
{
    struct signalfd_siginfo info;
    while (read(sigfd, &info, sizeof info) == (ssize_t)sizeof info)
        if (info.ssi_signo == SIGUSR1)
            reopen_log_file(); /* SIGCHLD: the caller's waitpid looks */
}

/* Log mode's wait for the child (our init, or the workload without namespaces): copies the
 * output into the log meanwhile, and after the exit what the pipes still hold, so that the
 * status, recorded next, is only seen with the whole output already in the log. Returns as
 * waitpid. */
static int copy_logs_until_exit(pid_t pid, int *wstatus)
{
    int sigfd = log_signals();
    pid_t reaped;
    while ((reaped = waitpid(pid, wstatus, WNOHANG)) != pid) {
        if (reaped < 0 && errno != EINTR)
            break;
        struct pollfd watched[3 + ATTACH_POLL_MAX] = {{cri_log.streams[0].fd, POLLIN, 0},
                                                      {cri_log.streams[1].fd, POLLIN, 0},
                                                      {sigfd, POLLIN, 0}};
        int attached = attach_poll_fds(watched + 3);
        int timeout = sigfd < 0 ? LOG_POLL_FALLBACK_MS : -1;
        if (poll(watched, (nfds_t)(3 + attached), timeout) < 0 && errno != EINTR) {
            /* Cannot watch: keep the status at least. */
            while ((reaped = waitpid(pid, wstatus, 0)) < 0 && errno == EINTR)
                ;
            break;
        }
        /* A reopen first: what is read once it was asked for goes to the new file. */
        if (sigfd >= 0 && (watched[2].revents & POLLIN))
            take_log_signals(sigfd);
        for (int i = 0; i < 2; i++)
            if (watched[i].revents != 0)
                pump(&cri_log.streams[i], LOG_READ_MAX);
        attach_serve(watched + 3, attached);
    }
    drain_logs();
    attach_finish(); /* the clients get the rest of the output, then EOF */
    if (sigfd >= 0)
        close(sigfd);
    return reaped == pid ? 0 : -1;
}

/* --- log relay mode (--log-relay): containerd's logging binary --------------------------- */

/* containerd's shim runs a task's logging binary (a task whose stdout is `binary://PATH?QUERY`)
 * with the task's stdout and stderr as the read ends of two pipes on fds 3 and 4, and fd 5 to
 * close once it reads them; the query comes as `key value` pairs, in no fixed order. So
 *   containerizer-supervisor --log-relay LOG --pid-file FILE     (the pairs either way round)
 * appends both streams to LOG as CRI records, exactly as --log-file does, and SIGUSR1 reopens
 * LOG. FILE gets `<pid> <start time>` before fd 5 is closed: the relay is the shim's child, not
 * the service's, and outlives a restart of the service, which finds it there to signal it. The
 * relay ends at EOF on both pipes, or at the shim's SIGTERM (the task is being deleted) once
 * what the pipes still hold is written, so a deleted task's log is complete. A LOG that cannot
 * be opened loses the records until a reopen succeeds: a workload must not die of a broken
 * pipe because its log cannot be written. */
#define RELAY_FIRST_STREAM_FD 3
#define RELAY_READY_FD 5

static int is_log_relay(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--log-relay") == 0)
            return 1;
    return 0;
}

/* The service's file (its own directory, root's only): written whole before the readiness. */
static void write_relay_pid_file(const char *path)
{
    char line[64];
    int n = snprintf(line, sizeof line, "%d %llu\n", (int)getpid(), start_time(getpid()));
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        fail("pid-file", path, errno);
    if (write_all(fd, line, (size_t)n) < 0 || close(fd) < 0)
        fail("pid-file", path, errno);
}

static void parse_relay_args(int argc, char **argv, const char **log, const char **pid_file)
{
    if (argc != 5)
        usage_error("usage: containerizer-supervisor --log-relay LOG --pid-file FILE", NULL);
    for (int i = 1; i < argc; i += 2) {
        if (strcmp(argv[i], "--log-relay") == 0)
            *log = argv[i + 1];
        else if (strcmp(argv[i], "--pid-file") == 0)
            *pid_file = argv[i + 1];
        else
            usage_error("log relay: unknown option", argv[i]);
    }
    if (*log == NULL || *pid_file == NULL)
        usage_error("usage: containerizer-supervisor --log-relay LOG --pid-file FILE", NULL);
    if ((*log)[0] != '/' || strlen(*log) >= sizeof cri_log.path)
        usage_error("--log-relay needs an absolute path, got", *log);
}

/* SIGUSR1 (reopen) and SIGTERM (finish) as a readable fd; -1 if that cannot be had. */
static int relay_signals(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
        return -1;
    return signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
}

/* Reopens on SIGUSR1; returns 1 once SIGTERM came. */
static int take_relay_signals(int sigfd)
{
    struct signalfd_siginfo info;
    int finish = 0;
    while (read(sigfd, &info, sizeof info) == (ssize_t)sizeof info) {
        if (info.ssi_signo == SIGUSR1 && cri_log.path[0] != '\0') /* the sandbox relay: none */
            reopen_log_file();
        else if (info.ssi_signo == SIGTERM)
            finish = 1;
    }
    return finish;
}

/* The shim's pipes (fds 3 and 4) become the streams the pump reads. */
static void take_relay_pipes(const char *mode)
{
    for (int i = 0; i < 2; i++) {
        int fd = RELAY_FIRST_STREAM_FD + i;
        if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
            fail(mode, cri_log.streams[i].name, errno);
        cri_log.streams[i].fd = fd;
    }
}

/* Copies the pipes (into the CRI log, or the sandbox's files) until EOF on both or the shim's
 * SIGTERM, then what they still hold. */
static void relay_until_end(int sigfd)
{
    while (cri_log.streams[0].fd >= 0 || cri_log.streams[1].fd >= 0) {
        struct pollfd watched[3] = {{cri_log.streams[0].fd, POLLIN, 0},
                                    {cri_log.streams[1].fd, POLLIN, 0},
                                    {sigfd, POLLIN, 0}};
        if (poll(watched, 3, sigfd < 0 ? LOG_POLL_FALLBACK_MS : -1) < 0 && errno != EINTR)
            break;
        /* A reopen first: what is read once it was asked for goes to the new file. */
        if (sigfd >= 0 && (watched[2].revents & POLLIN) && take_relay_signals(sigfd))
            break;
        for (int i = 0; i < 2; i++)
            if (watched[i].revents != 0)
                pump(&cri_log.streams[i], LOG_READ_MAX);
    }
    drain_logs();
}

static int run_log_relay(int argc, char **argv)
{
    const char *log = NULL, *pid_file = NULL, *reason;
    parse_relay_args(argc, argv, &log, &pid_file);
    strcpy(cri_log.path, log);
    cri_log.fd = open_log_file(log, &reason);
    take_relay_pipes("log-relay");
    int sigfd = relay_signals();
    write_relay_pid_file(pid_file);
    close(RELAY_READY_FD);
    (void)chdir("/");
    relay_until_end(sigfd);
    return 0;
}

/* --- the sandbox's stdout and stderr written by the supervisor ---------------------------- */

/* For a client to get the output it must pass through the supervisor, also when there is no CRI
 * log: then the log's pipes bring it, and it is appended as it comes to the sandbox's stdout and
 * stderr, the files the workload writes itself when nothing needs its output to pass through us
 * (opened as it opens them: no symlink, a regular file of its own; given to the workload's user,
 * 0640). It passes through with an attach socket, and to rotate the files (--output-max-size). */
static int sandbox_outputs[2] = {-1, -1};

/* Whether the workload's stdout and stderr are pipes the supervisor reads (into the CRI log, or
 * into the sandbox's files) rather than the sandbox's files themselves. */
static int output_piped(const struct options *opts)
{
    return opts->log_file != NULL || opts->attach_socket != NULL || opts->output_max_size > 0;
}

/* dir/name opened to append the workload's output: never through a symlink (O_NOFOLLOW), a FIFO
 * put there refused rather than waited on (O_NONBLOCK, which changes nothing on a regular
 * file), kept only if it is a regular file of its own (not linked from elsewhere), and given to
 * uid:gid, 0640. `flags` may add O_EXCL: a file that must be new. Returns the fd, or -1 with
 * *reason set. */
static int open_output_file(int dir, const char *name, int flags, uid_t uid, gid_t gid,
                            const char **reason)
{
    struct stat info;
    int fd = openat(dir, name,
                    O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | flags,
                    0640);
    if (fd < 0) {
        *reason = error_text(errno);
        return -1;
    }
    *reason = "not a regular file of its own";
    if (fstat(fd, &info) == 0 && S_ISREG(info.st_mode) && info.st_nlink == 1) {
        if (((info.st_uid == uid && info.st_gid == gid) || fchown(fd, uid, gid) == 0) &&
            ((info.st_mode & 07777) == 0640 || fchmod(fd, 0640) == 0))
            return fd;
        *reason = error_text(errno);
    }
    close(fd);
    return -1;
}

static int open_sandbox_output(int dir, const struct options *opts, const char *name)
{
    char shown[PATH_MAX];
    const char *reason;
    uid_t uid = (opts->identity_given ? opts->uid : 0) + (uid_t)opts->userns_uid;
    gid_t gid = (opts->identity_given ? opts->gid : 0) + (gid_t)opts->userns_gid;
    int fd = open_output_file(dir, name, 0, uid, gid, &reason);
    if (fd < 0) {
        snprintf(shown, sizeof shown, "%s/%s", opts->sandbox, name);
        fail_because(name, shown, reason);
    }
    return fd;
}

/* --- the sandbox's files rotated by size (--output-max-size, --output-max-files) ----------- */

/* Once a stream's file has reached max_size it becomes stdout.1 (stdout.1 becomes stdout.2, and
 * so on; what would become stdout.<max_files> is removed) and a new stdout takes its name. So a
 * stream keeps at most max_files files, each of at most max_size bytes and one read from its
 * pipe: a read is appended whole before the rotation, never split across two files.
 *
 * The sandbox is the workload's directory: it may put a symlink, a directory or a FIFO at any of
 * these names at any time. So everything is done by name relative to the directory opened with
 * O_NOFOLLOW at the launch; renameat and unlinkat act on a link itself, never on its target; and
 * the new file is made with O_EXCL, so that whatever the workload put at its name is refused,
 * never opened. */
#define ROTATED_NAME_MAX 16 /* "stdout.100" */

static struct {
    int dir; /* the sandbox directory; -1 without rotation */
    unsigned long long max_size;
    unsigned int max_files; /* the current file and max_files - 1 rotated ones */
    uid_t uid;              /* the new files' owner: the workload's user */
    gid_t gid;
    unsigned long long written[2]; /* each stream's current file's size, as we appended to it */
} rotation = {.dir = -1};

/* The k-th file of a stream: "stdout" for 0, else "stdout.k". */
static void rotated_name(char *name, int stream, unsigned int k)
{
    const char *base = cri_log.streams[stream].name;
    if (k == 0)
        snprintf(name, ROTATED_NAME_MAX, "%s", base);
    else
        snprintf(name, ROTATED_NAME_MAX, "%s.%u", base, k);
}

/* Removes a file, a link (itself) or an empty directory at `name`. A directory that holds
 * something stays: it is the workload's, and nothing of it is walked into. */
static void remove_rotated(const char *name)
{
    if (unlinkat(rotation.dir, name, 0) < 0 && (errno == EISDIR || errno == EPERM))
        (void)unlinkat(rotation.dir, name, AT_REMOVEDIR);
}

/* The oldest out, then stdout.<k-1> to stdout.<k> down to stdout to stdout.1, so that each lands
 * on a free name or on a file it replaces. A name that cannot be moved (the next one is a
 * directory with something in it) is removed instead: what it held is dropped rather than kept
 * beyond the bound, and its name is free for the next. */
static void shift_rotated(int stream)
{
    char from[ROTATED_NAME_MAX], to[ROTATED_NAME_MAX];
    rotated_name(to, stream, rotation.max_files - 1);
    remove_rotated(to);
    for (unsigned int k = rotation.max_files - 1; k > 0; k--) {
        rotated_name(from, stream, k - 1);
        rotated_name(to, stream, k);
        if (renameat(rotation.dir, from, rotation.dir, to) < 0 && errno != ENOENT)
            remove_rotated(from);
    }
}

/* After an append: a stream's file that reached max_size is rotated. When no new file can be
 * made at the name (the workload put a directory or anything else there first), the container
 * is not failed: its output goes on into the current file, which starts over (truncated), so
 * that the disk still holds no more than the bound. The workload that blocked the name loses
 * its own older output; the node loses nothing. */
static void rotate_if_full(int stream)
{
    char name[ROTATED_NAME_MAX];
    const char *reason;
    if (rotation.dir < 0 || rotation.written[stream] < rotation.max_size)
        return;
    shift_rotated(stream);
    rotated_name(name, stream, 0);
    int fd = open_output_file(rotation.dir, name, O_EXCL, rotation.uid, rotation.gid, &reason);
    if (fd < 0) {
        if (ftruncate(sandbox_outputs[stream], 0) == 0)
            rotation.written[stream] = 0;
        return;
    }
    close(sandbox_outputs[stream]);
    sandbox_outputs[stream] = fd;
    rotation.written[stream] = 0;
}

/* With --output-max-size the sandbox directory stays open: the rotation renames and creates in
 * it. The files' sizes count from what a previous launch left in them. */
static void prepare_rotation(int dir, const struct options *opts)
{
    struct stat info;
    if (opts->output_max_size == 0) {
        close(dir);
        return;
    }
    rotation.dir = dir;
    rotation.max_size = opts->output_max_size;
    rotation.max_files = opts->output_max_files;
    /* host ids: with --userns the workload's, through its mapping */
    rotation.uid = (opts->identity_given ? opts->uid : 0) + (uid_t)opts->userns_uid;
    rotation.gid = (opts->identity_given ? opts->gid : 0) + (gid_t)opts->userns_gid;
    for (int i = 0; i < 2; i++)
        if (fstat(sandbox_outputs[i], &info) == 0)
            rotation.written[i] = (unsigned long long)info.st_size;
}

static void prepare_sandbox_outputs(const struct options *opts)
{
    int dir = open(opts->sandbox, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dir < 0)
        fail("sandbox", opts->sandbox, errno);
    for (int i = 0; i < 2; i++) {
        int ends[2];
        sandbox_outputs[i] = open_sandbox_output(dir, opts, cri_log.streams[i].name);
        if (pipe2(ends, O_CLOEXEC) < 0 || fcntl(ends[0], F_SETFL, O_NONBLOCK) < 0)
            fail("pipe", cri_log.streams[i].name, errno);
        cri_log.streams[i].fd = ends[0];
        cri_log.write_ends[i] = ends[1];
    }
    prepare_rotation(dir, opts);
}

/* In pump: the output as it came, to the sandbox's file; 0 in CRI log mode (records instead). */
static int write_sandbox_output(int stream, const char *data, size_t length)
{
    if (sandbox_outputs[0] < 0)
        return 0;
    struct iovec part = {(void *)data, length};
    append_parts(sandbox_outputs[stream], &part, 1);
    rotation.written[stream] += length;
    rotate_if_full(stream);
    return 1;
}

/* Whether the supervisor carries the workload's output (its loop: copy_logs_until_exit). */
static int output_through_supervisor(void)
{
    return cri_log.fd >= 0 || sandbox_outputs[0] >= 0;
}

/* --- sandbox relay mode (--sandbox-relay): containerd's logging binary for the sandbox -------- */

/* A containerd task without a CRI log would have its shim append stdout and stderr straight to
 * the sandbox's files, which then grow without bound. To rotate them the service makes the
 * task's logging binary (see "log relay mode" above for how the shim runs it)
 *   containerizer-supervisor --sandbox-relay DIR --output-max-size N --output-max-files K
 *                            --uid U --gid G                       (the pairs in any order)
 * which appends what comes on fds 3 and 4 to DIR/stdout and DIR/stderr, and rotates them, with
 * the functions a launch's supervisor uses for --output-max-size: by name relative to DIR opened
 * with O_NOFOLLOW, never through a link, each file given to U:G, 0640. It ends as the log relay
 * does: at EOF on both pipes, or at the shim's SIGTERM (the task is being deleted) once what the
 * pipes still hold is written, so a deleted task's output is complete. A file that cannot be
 * opened (DIR is gone, or the workload put a directory at the name) loses that stream's output
 * until its next rotation makes the file anew: a workload must not die of a broken pipe. */
#define SANDBOX_RELAY_OPTIONS 5 /* each with its value */
#define SANDBOX_RELAY_ARGC (1 + 2 * SANDBOX_RELAY_OPTIONS)

static const char sandbox_relay_usage[] =
    "usage: containerizer-supervisor --sandbox-relay DIR --output-max-size N"
    " --output-max-files K --uid U --gid G";

static int is_sandbox_relay(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--sandbox-relay") == 0)
            return 1;
    return 0;
}

/* Each of the five pairs exactly once; the options as a launch's supervisor would hold them. */
static void parse_sandbox_relay_args(int argc, char **argv, struct options *opts)
{
    static const char *const names[SANDBOX_RELAY_OPTIONS] = {"--sandbox-relay", "--output-max-size",
                                        "--output-max-files", "--uid", "--gid"};
    unsigned int seen = 0, k;
    if (argc != SANDBOX_RELAY_ARGC)
        usage_error(sandbox_relay_usage, NULL);
    for (int i = 1; i < argc; i += 2) {
        const char *value = argv[i + 1];
        for (k = 0; k < SANDBOX_RELAY_OPTIONS && strcmp(argv[i], names[k]) != 0; k++)
            ;
        if (k == SANDBOX_RELAY_OPTIONS || (seen & (1u << k)))
            usage_error("sandbox relay: unknown or repeated option", argv[i]);
        seen |= 1u << k;
        if (k == 0)
            opts->sandbox = value;
        else if (k == 3)
            opts->uid = parse_id(value, "--uid needs a number, got");
        else if (k == 4)
            opts->gid = parse_id(value, "--gid needs a number, got");
        else
            (void)take_output_option(opts, argv[i], value);
    }
    if (opts->sandbox[0] != '/')
        usage_error("--sandbox-relay needs an absolute path, got", opts->sandbox);
    opts->identity_given = GIVEN_UID | GIVEN_GID;
}

/* A stream whose file cannot be opened writes to /dev/null (its own fd: a rotation closes it). */
static void open_relayed_outputs(const struct options *opts)
{
    const char *reason;
    int dir = open(opts->sandbox, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    for (int i = 0; i < 2; i++) {
        const char *name = cri_log.streams[i].name;
        int fd = dir < 0 ? -1 : open_output_file(dir, name, 0, opts->uid, opts->gid, &reason);
        sandbox_outputs[i] = fd >= 0 ? fd : open("/dev/null", O_WRONLY | O_CLOEXEC);
    }
    if (dir >= 0)
        prepare_rotation(dir, opts);
}

static int run_sandbox_relay(int argc, char **argv)
{
    struct options opts;
    memset(&opts, 0, sizeof opts);
    parse_sandbox_relay_args(argc, argv, &opts);
    open_relayed_outputs(&opts);
    take_relay_pipes("sandbox-relay");
    int sigfd = relay_signals();
    close(RELAY_READY_FD);
    (void)chdir("/");
    relay_until_end(sigfd);
    return 0;
}

/* --- attach socket (--attach-socket): the workload's stdio open to clients ----------------- */

/* CRI Attach: a client connects to the container's first process's stdin, stdout and stderr at
 * any time after it started, and the supervisor, which outlives the service, is what holds them.
 * With --attach-socket PATH the output comes through pipes (the CRI log's, or the sandbox's
 * above), and the supervisor listens on a unix socket made before the fork at PATH, in a
 * directory the caller made: root's, 0700 (it is refused otherwise), the socket 0600; a peer
 * of another user is refused too. The supervisor serves it in its log loop, and removes it when
 * the workload has ended.
 *
 * Frames both ways: a type byte, the payload's length (4 bytes, big-endian), the payload.
 *   to a client:   HELLO (1 byte: 1 stdin is open, 2 a terminal) first, then STDOUT and STDERR
 *                  with what the workload wrote (also in the log, whoever is attached); EOF once
 *                  the workload ended and its output was sent
 *   from a client: STDIN (bytes for the workload), CLOSE_STDIN (this client's input ended),
 *                  RESIZE (columns, rows: 2 bytes each, big-endian; with --tty), STREAMS (1
 *                  byte: 1 stdout, 2 stderr; the output it wants from now on, both at first)
 * Nothing a client does blocks the workload or the log: output is queued per client, and a
 * client whose queue is full is dropped; input waits in one fixed buffer for the workload to
 * read it, and meanwhile the clients' input is not read. At most ATTACH_CLIENTS_MAX clients; one
 * more is closed at once. Memory: a client's buffers are allocated while it is attached (and
 * its socket may hold ATTACH_SOCKET_BUFFER in the kernel, so a reader that is a little slower
 * than a burst is not dropped).
 *
 * --stdin: the workload's stdin is a pipe whose write end the supervisor holds (else /dev/null);
 * its input ends only with --stdin-once, when the first client that gave input ends it
 * (CLOSE_STDIN, or a detach). --tty: stdin, stdout and stderr are the slave of a pty whose
 * master the supervisor reads (the log's stdout: a terminal has one output) and writes; the
 * workload gets it as its controlling terminal; its input ended (--stdin-once) hangs it up
 * (SIGHUP to its foreground process group), as containerd's closed console does. */
#define ATTACH_CLIENTS_MAX 8
#define ATTACH_HEADER 5
#define ATTACH_FRAME_MAX (32u << 10)    /* the largest payload a client may send */
#define ATTACH_CLIENT_QUEUE (1u << 20)  /* output queued for one client before it is dropped */
#define ATTACH_STDIN_BUFFER (64u << 10)
#define ATTACH_SOCKET_BUFFER (2 << 20)  /* the kernel's share of a client's backlog */
#define ATTACH_FLUSH_MS 1000            /* at the end, how long clients may take to read */
#define ATTACH_IN_SIZE (ATTACH_HEADER + ATTACH_FRAME_MAX)

enum attach_frame {
    FRAME_STDIN = 0,
    FRAME_STDOUT = 1, /* FRAME_STDOUT + 1 is FRAME_STDERR, as the log's streams */
    FRAME_STDERR = 2,
    FRAME_CLOSE_STDIN = 3,
    FRAME_RESIZE = 4,
    FRAME_HELLO = 5,
    FRAME_STREAMS = 6,
};
enum { HELLO_STDIN = 1, HELLO_TTY = 2 };
enum { OWNER_LISTEN = -1, OWNER_STDIN = -2 }; /* who a polled fd is, besides a client's index */

struct attach_client {
    char *memory; /* NULL: a free slot; else the input frame buffer, then the output queue */
    int fd;
    int gave_input; /* its detach ends the workload's input with --stdin-once */
    int streams;    /* the output it wants: 1 << 0 stdout, 1 << 1 stderr */
    size_t in_used;
    size_t out_start, out_end;
};

static struct {
    int listen_fd;   /* -1 without --attach-socket, and once the workload ended */
    int dir_fd;      /* the socket's directory (O_PATH): bound and removed through it */
    char name[NAME_MAX + 1];
    struct stat socket_file; /* removed only if it still is ours */
    int stdin_fd;    /* the workload's input: the pipe's write end or the pty master; -1 */
    int stdin_once;
    int stdin_closing; /* closed once what is buffered was written */
    int terminal;    /* the pty master, for window sizes; -1 without --tty */
    int child_stdin; /* what becomes the child's fd 0; the supervisor closes it after the fork */
    size_t stdin_used;
    char stdin_buffer[ATTACH_STDIN_BUFFER];
    struct attach_client clients[ATTACH_CLIENTS_MAX];
    int owners[ATTACH_POLL_MAX];
} attach = {.listen_fd = -1, .dir_fd = -1, .stdin_fd = -1, .terminal = -1, .child_stdin = -1};

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* The directory must be one only we may enter: then nobody else can reach the socket, or put
 * anything at its name. */
static void open_socket_dir(const char *path)
{
    char dir[PATH_MAX];
    struct stat info;
    const char *slash = strrchr(path, '/');
    if (path[0] != '/' || slash[1] == '\0' || strlen(slash + 1) > NAME_MAX ||
        (size_t)(slash - path) >= sizeof dir)
        usage_error("--attach-socket needs the absolute path of a file, got", path);
    strcpy(attach.name, slash + 1);
    snprintf(dir, sizeof dir, "%.*s", slash == path ? 1 : (int)(slash - path), path);
    attach.dir_fd = open(dir, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (attach.dir_fd < 0 || fstat(attach.dir_fd, &info) < 0)
        fail("attach-socket", dir, errno);
    if (info.st_uid != geteuid() || (info.st_mode & 077) != 0)
        fail_because("attach-socket", dir, "not a directory of ours closed to others (0700)");
}

/* Bound through /proc/self/fd/N/NAME: the directory opened above, and a path of any length
 * (sun_path holds 108 bytes). */
static void attach_listen(const char *path)
{
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    open_socket_dir(path);
    if (snprintf(address.sun_path, sizeof address.sun_path, "/proc/self/fd/%d/%s", attach.dir_fd,
                 attach.name) >= (int)sizeof address.sun_path)
        usage_error("--attach-socket: the socket's name is too long:", attach.name);
    attach.listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (attach.listen_fd < 0)
        fail("attach-socket", "socket", errno);
    mode_t mask = umask(0177); /* the socket file is 0600 from the start */
    int bound = bind(attach.listen_fd, (struct sockaddr *)&address, sizeof address);
    umask(mask);
    if (bound < 0 || listen(attach.listen_fd, ATTACH_CLIENTS_MAX) < 0 ||
        fstatat(attach.dir_fd, attach.name, &attach.socket_file, AT_SYMLINK_NOFOLLOW) < 0)
        fail("attach-socket", path, errno);
}

/* With --tty the log's stdout stream reads the pty master instead of a pipe, and there is no
 * stderr stream: the slave is the workload's stdout and stderr (and stdin). */
static void open_terminal(int with_stdin)
{
    int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0 || unlockpt(master) < 0 || fcntl(master, F_SETFL, O_NONBLOCK) < 0)
        fail("tty", "/dev/ptmx", errno);
    int slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    attach.terminal = fcntl(master, F_DUPFD_CLOEXEC, 3);
    attach.child_stdin = slave < 0 ? -1 : fcntl(slave, F_DUPFD_CLOEXEC, 3);
    if (slave < 0 || attach.terminal < 0 || attach.child_stdin < 0)
        fail("tty", "pty", errno);
    if (with_stdin && (attach.stdin_fd = fcntl(master, F_DUPFD_CLOEXEC, 3)) < 0)
        fail("tty", "pty", errno);
    for (int i = 0; i < 2; i++) {
        close_fd(&cri_log.streams[i].fd);
        close_fd(&cri_log.write_ends[i]);
    }
    cri_log.streams[0].fd = master;
    cri_log.write_ends[0] = slave;
    cri_log.write_ends[1] = fcntl(slave, F_DUPFD_CLOEXEC, 3);
    if (cri_log.write_ends[1] < 0)
        fail("tty", "pty", errno);
}

/* In the supervisor before the fork, after prepare_cri_log or prepare_sandbox_outputs. */
static void attach_prepare(const struct options *opts)
{
    if (opts->attach_socket == NULL)
        return;
    attach_listen(opts->attach_socket);
    attach.stdin_once = opts->stdin_once;
    if (opts->tty) {
        open_terminal(opts->keep_stdin);
    } else if (opts->keep_stdin) {
        int ends[2];
        if (pipe2(ends, O_CLOEXEC) < 0 || fcntl(ends[1], F_SETFL, O_NONBLOCK) < 0)
            fail("pipe", "stdin", errno);
        attach.child_stdin = ends[0];
        attach.stdin_fd = ends[1];
    }
}

/* In the child, after attach_log_pipes: its stdin, and none of the supervisor's ends (the init
 * never execs: a write end kept there would keep the workload's input from ever ending). */
static void attach_child_stdio(int errpipe)
{
    if (attach.child_stdin >= 0 && dup2(attach.child_stdin, STDIN_FILENO) < 0)
        child_fail(errpipe, "stdin", "attach", error_text(errno));
    close_fd(&attach.child_stdin);
    close_fd(&attach.listen_fd);
    close_fd(&attach.dir_fd);
    close_fd(&attach.stdin_fd);
    close_fd(&attach.terminal);
    close_fd(&sandbox_outputs[0]);
    close_fd(&sandbox_outputs[1]);
    close_fd(&rotation.dir);
}

/* In the supervisor once the child runs. */
static void attach_close_child_ends(void)
{
    close_fd(&attach.child_stdin);
}

/* The workload, right before its confinement: the pty becomes its controlling terminal (job
 * control, ^C as SIGINT, SIGWINCH on a resize), in a session of its own. */
static void take_terminal(const struct options *opts, int errpipe)
{
    if (!opts->tty || exec_mode) /* exec mode's command took the caller's terminal already */
        return;
    if (setsid() < 0 || ioctl(STDIN_FILENO, TIOCSCTTY, 0) < 0)
        child_fail(errpipe, "tty", "controlling terminal", error_text(errno));
}

/* --- the workload's input --- */

static void end_stdin(void)
{
    close_fd(&attach.stdin_fd);
    attach.stdin_used = 0;
}

/* Writes what is buffered, as much as the workload takes now. */
static void flush_stdin(void)
{
    while (attach.stdin_fd >= 0 && attach.stdin_used > 0) {
        ssize_t n = write(attach.stdin_fd, attach.stdin_buffer, attach.stdin_used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) { /* EPIPE: the workload closed its stdin, nobody will read more */
            end_stdin();
            return;
        }
        memmove(attach.stdin_buffer, attach.stdin_buffer + n, attach.stdin_used - (size_t)n);
        attach.stdin_used -= (size_t)n;
    }
    if (attach.stdin_closing && attach.stdin_used == 0) {
        /* A terminal's input has no EOF: its end is a hangup, as when a console is closed.
         * The group is the kernel's answer for the slave, so it is the container's. */
        pid_t group;
        if (attach.terminal >= 0 && ioctl(attach.terminal, TIOCGPGRP, &group) == 0 && group > 1) {
            (void)kill(-group, SIGHUP);
            (void)kill(-group, SIGCONT);
        }
        end_stdin();
    }
}

/* A client's input ended: with --stdin-once the workload's ends too, once it read the rest. */
static void end_input(void)
{
    if (!attach.stdin_once || attach.stdin_fd < 0)
        return;
    attach.stdin_closing = 1;
    flush_stdin();
}

/* Whether `length` bytes of input can be taken now (input nobody can read is taken and
 * dropped). */
static int stdin_has_room(size_t length)
{
    if (attach.stdin_fd < 0 || attach.stdin_closing)
        return 1;
    return attach.stdin_used + length <= sizeof attach.stdin_buffer;
}

static void take_stdin(const char *data, size_t length)
{
    if (attach.stdin_fd < 0 || attach.stdin_closing)
        return;
    memcpy(attach.stdin_buffer + attach.stdin_used, data, length);
    attach.stdin_used += length;
}

static void resize_terminal(const unsigned char *size)
{
    struct winsize window = {.ws_col = (unsigned short)(size[0] << 8 | size[1]),
                             .ws_row = (unsigned short)(size[2] << 8 | size[3])};
    if (attach.terminal >= 0 && window.ws_col > 0 && window.ws_row > 0)
        (void)ioctl(attach.terminal, TIOCSWINSZ, &window);
}

/* --- clients --- */

static void drop_client(struct attach_client *client)
{
    close(client->fd);
    free(client->memory);
    int gave_input = client->gave_input;
    memset(client, 0, sizeof *client);
    client->fd = -1;
    if (gave_input)
        end_input();
}

/* Sends what is queued, as much as the client takes now; 0 if the client was dropped. */
static int flush_client(struct attach_client *client)
{
    char *queue = client->memory + ATTACH_IN_SIZE;
    while (client->out_start < client->out_end) {
        ssize_t n = send(client->fd, queue + client->out_start,
                         client->out_end - client->out_start, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return 1;
        if (n < 0) {
            drop_client(client);
            return 0;
        }
        client->out_start += (size_t)n;
    }
    client->out_start = client->out_end = 0;
    return 1;
}

/* Queues one frame for the client and sends what it takes; a client with no room left for it
 * reads too slowly to be waited for, and is dropped. */
static void send_frame(struct attach_client *client, int type, const char *data, size_t length)
{
    char *queue = client->memory + ATTACH_IN_SIZE;
    if (client->out_end + ATTACH_HEADER + length > ATTACH_CLIENT_QUEUE && client->out_start > 0) {
        memmove(queue, queue + client->out_start, client->out_end - client->out_start);
        client->out_end -= client->out_start;
        client->out_start = 0;
    }
    if (client->out_end + ATTACH_HEADER + length > ATTACH_CLIENT_QUEUE) {
        drop_client(client);
        return;
    }
    unsigned char header[ATTACH_HEADER] = {(unsigned char)type, (unsigned char)(length >> 24),
                                           (unsigned char)(length >> 16),
                                           (unsigned char)(length >> 8), (unsigned char)length};
    memcpy(queue + client->out_end, header, ATTACH_HEADER);
    memcpy(queue + client->out_end + ATTACH_HEADER, data, length);
    client->out_end += ATTACH_HEADER + length;
    (void)flush_client(client);
}

static void attach_broadcast(int stream, const char *data, size_t length)
{
    for (int i = 0; i < ATTACH_CLIENTS_MAX; i++)
        if (attach.clients[i].memory != NULL && (attach.clients[i].streams & (1 << stream)))
            send_frame(&attach.clients[i], FRAME_STDOUT + stream, data, length);
}

/* Only our own user (root) may attach, even if the directory was opened to others since. */
static int peer_is_ours(int fd)
{
    struct ucred peer;
    socklen_t size = sizeof peer;
    return getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &size) == 0 && peer.uid == geteuid();
}

static void accept_client(void)
{
    int fd = accept4(attach.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
        return;
    struct attach_client *client = NULL;
    for (int i = 0; i < ATTACH_CLIENTS_MAX && client == NULL; i++)
        if (attach.clients[i].memory == NULL)
            client = &attach.clients[i];
    char *memory = client != NULL && peer_is_ours(fd)
                       ? malloc(ATTACH_IN_SIZE + ATTACH_CLIENT_QUEUE)
                       : NULL;
    if (memory == NULL) { /* refused: it sees EOF without a HELLO */
        close(fd);
        return;
    }
    *client = (struct attach_client){.memory = memory, .fd = fd, .streams = 3};
    /* A client that reads a burst a little slower than the workload writes it is not one to
     * drop: the kernel holds the backlog first (best effort: the default if refused). */
    int size = ATTACH_SOCKET_BUFFER;
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size);
    char hello = (char)((attach.stdin_fd >= 0 && !attach.stdin_closing ? HELLO_STDIN : 0) |
                        (attach.terminal >= 0 ? HELLO_TTY : 0));
    send_frame(client, FRAME_HELLO, &hello, 1);
}

/* Acts on the complete frames the client sent; input waits (and the client's next bytes with
 * it) while the workload's buffer is full. A frame of no known kind or size drops the client. */
static void take_frames(struct attach_client *client)
{
    const unsigned char *in = (const unsigned char *)client->memory;
    size_t at = 0;
    while (client->in_used - at >= ATTACH_HEADER) {
        int type = in[at];
        size_t length = (size_t)in[at + 1] << 24 | (size_t)in[at + 2] << 16 |
                        (size_t)in[at + 3] << 8 | in[at + 4];
        int known = (type == FRAME_STDIN && length <= ATTACH_FRAME_MAX) ||
                    (type == FRAME_CLOSE_STDIN && length == 0) ||
                    (type == FRAME_RESIZE && length == 4) ||
                    (type == FRAME_STREAMS && length == 1);
        if (!known) {
            drop_client(client);
            return;
        }
        if (client->in_used - at < ATTACH_HEADER + length)
            break;
        const char *payload = client->memory + at + ATTACH_HEADER;
        if (type == FRAME_STDIN) {
            if (!stdin_has_room(length))
                break;
            take_stdin(payload, length);
            client->gave_input = 1;
        } else if (type == FRAME_CLOSE_STDIN) {
            client->gave_input = 0;
            end_input();
        } else if (type == FRAME_RESIZE) {
            resize_terminal((const unsigned char *)payload);
        } else {
            client->streams = payload[0] & 3;
        }
        at += ATTACH_HEADER + length;
    }
    memmove(client->memory, client->memory + at, client->in_used - at);
    client->in_used -= at;
}

static void serve_client(struct attach_client *client, short events)
{
    if ((events & POLLOUT) && !flush_client(client))
        return;
    if (!(events & (POLLIN | POLLHUP | POLLERR)))
        return;
    if (client->in_used == ATTACH_IN_SIZE) { /* gone while its input waits: nothing to wait for */
        drop_client(client);
        return;
    }
    ssize_t n;
    do
        n = recv(client->fd, client->memory + client->in_used, ATTACH_IN_SIZE - client->in_used,
                 MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EAGAIN)
        return;
    if (n <= 0) {
        drop_client(client);
        return;
    }
    client->in_used += (size_t)n;
    take_frames(client);
}

/* The fds to poll (at most ATTACH_POLL_MAX) into fds; returns how many. */
static int attach_poll_fds(struct pollfd *fds)
{
    int count = 0;
    if (attach.listen_fd < 0)
        return 0;
    fds[count] = (struct pollfd){attach.listen_fd, POLLIN, 0};
    attach.owners[count++] = OWNER_LISTEN;
    if (attach.stdin_fd >= 0 && attach.stdin_used > 0) {
        fds[count] = (struct pollfd){attach.stdin_fd, POLLOUT, 0};
        attach.owners[count++] = OWNER_STDIN;
    }
    for (int i = 0; i < ATTACH_CLIENTS_MAX; i++) {
        const struct attach_client *client = &attach.clients[i];
        if (client->memory == NULL)
            continue;
        short events = (short)((client->in_used < ATTACH_IN_SIZE ? POLLIN : 0) |
                               (client->out_end > client->out_start ? POLLOUT : 0));
        fds[count] = (struct pollfd){client->fd, events, 0};
        attach.owners[count++] = i;
    }
    return count;
}

static void attach_serve(const struct pollfd *fds, int count)
{
    for (int i = 0; i < count; i++) {
        if (fds[i].revents == 0)
            continue;
        if (attach.owners[i] == OWNER_LISTEN)
            accept_client();
        else if (attach.owners[i] == OWNER_STDIN)
            flush_stdin();
        else if (attach.clients[attach.owners[i]].memory != NULL)
            serve_client(&attach.clients[attach.owners[i]], fds[i].revents);
    }
    /* Input that waited for room: the workload may have read since. */
    flush_stdin();
    for (int i = 0; i < ATTACH_CLIENTS_MAX; i++)
        if (attach.clients[i].memory != NULL && attach.clients[i].in_used > 0)
            take_frames(&attach.clients[i]);
    flush_stdin();
}

static long elapsed_ms(const struct timespec *since)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000 + (now.tv_nsec - since->tv_nsec) / 1000000;
}

/* Gives the clients what is queued for them (for ATTACH_FLUSH_MS at most). */
static void flush_clients(void)
{
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long left = ATTACH_FLUSH_MS; left > 0; left = ATTACH_FLUSH_MS - elapsed_ms(&start)) {
        struct pollfd waiting[ATTACH_CLIENTS_MAX];
        struct attach_client *owners[ATTACH_CLIENTS_MAX];
        nfds_t count = 0;
        for (int i = 0; i < ATTACH_CLIENTS_MAX; i++) {
            struct attach_client *client = &attach.clients[i];
            if (client->memory != NULL && client->out_end > client->out_start) {
                waiting[count] = (struct pollfd){client->fd, POLLOUT, 0};
                owners[count++] = client;
            }
        }
        if (count == 0 || (poll(waiting, count, (int)left) < 0 && errno != EINTR))
            return;
        for (nfds_t i = 0; i < count; i++)
            if (waiting[i].revents != 0 && flush_client(owners[i]) &&
                (waiting[i].revents & (POLLHUP | POLLERR)))
                drop_client(owners[i]);
    }
}

/* The workload ended and its output is in the queues: no new client, the clients get the rest
 * and EOF, and the socket goes (if what is at its name is still ours). */
static void attach_finish(void)
{
    struct stat now;
    if (attach.listen_fd < 0)
        return;
    close_fd(&attach.listen_fd);
    if (fstatat(attach.dir_fd, attach.name, &now, AT_SYMLINK_NOFOLLOW) == 0 &&
        now.st_ino == attach.socket_file.st_ino && now.st_dev == attach.socket_file.st_dev)
        (void)unlinkat(attach.dir_fd, attach.name, 0);
    close_fd(&attach.dir_fd);
    flush_clients();
    attach.stdin_once = 0; /* what a detach would do to the input no longer matters */
    for (int i = 0; i < ATTACH_CLIENTS_MAX; i++)
        if (attach.clients[i].memory != NULL)
            drop_client(&attach.clients[i]);
    end_stdin();
    close_fd(&attach.terminal);
}

/* --- the sandbox's files ------------------------------------------------------------------ */

static int sandbox_fd = -1; /* the sandbox directory, close-on-exec, kept until the exec */
static struct stat sandbox_files[3]; /* the directory, stdout and stderr as opened */

/* sandbox/<name> onto target: never through a symlink, never a file linked from elsewhere. */
static void open_output(int errpipe, const struct options *opts, const char *name, int target)
{
    char shown[PATH_MAX];
    struct stat *info = &sandbox_files[target];
    snprintf(shown, sizeof shown, "%s/%s", opts->sandbox, name);
    int fd = openat(sandbox_fd, name, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0640);
    if (fd < 0)
        child_fail(errpipe, name, shown, error_text(errno));
    if (fstat(fd, info) < 0 || !S_ISREG(info->st_mode) || info->st_nlink != 1)
        child_fail(errpipe, name, shown, "not a regular file of its own");
    if (dup2(fd, target) < 0) /* dup2 clears close-on-exec on target */
        child_fail(errpipe, name, shown, error_text(errno));
    close(fd);
}

/* The workload's stdio, opened before any namespace or root change: the paths are the host's. */
static void open_stdio(const struct options *opts, int errpipe)
{
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || dup2(fd, STDIN_FILENO) < 0)
        child_fail(errpipe, "stdin", "/dev/null", error_text(errno));
    close(fd);
    sandbox_fd = open(opts->sandbox, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (sandbox_fd < 0 || fstat(sandbox_fd, &sandbox_files[0]) < 0)
        child_fail(errpipe, "sandbox", opts->sandbox, error_text(errno));
    if (output_piped(opts)) {
        attach_log_pipes(errpipe); /* the supervisor writes the log (or the sandbox's files) */
        attach_child_stdio(errpipe);
        return;
    }
    open_output(errpipe, opts, "stdout", STDOUT_FILENO);
    open_output(errpipe, opts, "stderr", STDERR_FILENO);
}

/* fd (described by info) owned by uid:gid with mode; what already is so is left alone (each
 * change is an inode write: a launch into a fresh sandbox as root needs one). */
static int give(int fd, const struct stat *info, uid_t uid, gid_t gid, mode_t mode)
{
    if ((info->st_uid != uid || info->st_gid != gid) && fchown(fd, uid, gid) < 0)
        return -1;
    return (info->st_mode & 07777) != mode ? fchmod(fd, mode) : 0;
}

/* The container's user owns its sandbox and what it writes there; other host users read none. */
static void give_sandbox(int errpipe, const struct options *opts, uid_t uid, gid_t gid)
{
    if (sandbox_fd < 0)
        return; /* exec mode: the container's sandbox was given at its launch */
    /* In CRI log mode stdout and stderr are pipes, and the log is the supervisor's; when it
     * writes the sandbox's files (output_piped) it gave them already. */
    if (give(sandbox_fd, &sandbox_files[0], uid, gid, 0750) < 0 ||
        (!output_piped(opts) &&
         (give(STDOUT_FILENO, &sandbox_files[STDOUT_FILENO], uid, gid, 0640) < 0 ||
          give(STDERR_FILENO, &sandbox_files[STDERR_FILENO], uid, gid, 0640) < 0)))
        child_fail(errpipe, "sandbox", opts->sandbox, error_text(errno));
}

/* --- who the workload runs as, and what it may do ----------------------------------------- */

/* The workload's uid and gid: --uid and --gid, or root's (the supervisor's own). */
static uid_t workload_uid(const struct options *opts)
{
    return opts->identity_given ? opts->uid : 0;
}

static gid_t workload_gid(const struct options *opts)
{
    return opts->identity_given ? opts->gid : 0;
}

/* --uid, --gid and --groups, numbers only: see the top of this file for why no name. */
static void become(int errpipe, const struct options *opts)
{
    if (setgroups(opts->n_groups, opts->groups) < 0)
        child_fail(errpipe, "user", "setgroups", error_text(errno));
    if (setgid(opts->gid) < 0)
        child_fail(errpipe, "user", "setgid", error_text(errno));
    if (setuid(opts->uid) < 0)
        child_fail(errpipe, "user", "setuid", error_text(errno));
}

static int set_capabilities(unsigned long long permitted, unsigned long long inheritable)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    for (int i = 0; i < 2; i++) {
        data[i].effective = data[i].permitted = (uint32_t)(permitted >> (32 * i));
        data[i].inheritable = (uint32_t)(inheritable >> (32 * i));
    }
    return (int)syscall(SYS_capset, &header, data);
}

/* Cuts the bounding set to the container's capabilities and clears the ambient set: nothing a
 * process here execs can ever gain more. */
static void drop_bounding_set(int errpipe, const struct options *opts)
{
    for (int cap = 0; cap <= opts->last_capability; cap++)
        if (!(opts->capabilities & (1ULL << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            child_fail(errpipe, "capabilities", "bounding set", error_text(errno));
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        child_fail(errpipe, "capabilities", "ambient set", error_text(errno));
}

/* no_new_privs, the seccomp filter and root's last capabilities: the steps right before exec. */
static void confine(int errpipe, const struct options *opts, int as_root)
{
    const unsigned long long sys_admin = 1ULL << CAP_SYS_ADMIN;
    if (opts->privileged) {
        if (opts->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
            child_fail(errpipe, "no_new_privs", NULL, error_text(errno));
        return;
    }
    /* Root keeps CAP_SYS_ADMIN only until the filter is loaded: without no_new_privs only a
     * holder of it may load one. */
    if (as_root && set_capabilities(opts->capabilities | sys_admin, opts->capabilities) < 0)
        child_fail(errpipe, "capabilities", NULL, error_text(errno));
    if ((opts->no_new_privs || !as_root) && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        child_fail(errpipe, "no_new_privs", NULL, error_text(errno));
    int filter = opts->seccomp.len > 0; /* --seccomp 0: none */
    if (filter && prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &opts->seccomp, 0, 0) < 0)
        child_fail(errpipe, "seccomp", NULL, error_text(errno));
    if (as_root && set_capabilities(opts->capabilities, opts->capabilities) < 0)
        child_fail(errpipe, "capabilities", NULL, error_text(errno));
}

static void reset_signals(void)
{
    sigset_t none;
    int sig;
    for (sig = 1; sig < NSIG; sig++)
        (void)signal(sig, SIG_DFL); /* fails harmlessly for SIGKILL, SIGSTOP and libc's own */
    sigemptyset(&none);
    (void)sigprocmask(SIG_SETMASK, &none, NULL);
}

static void close_other_fds(int errpipe)
{
    /* Close-on-exec rather than close, so the error pipe keeps working until exec. */
    if (close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) == 0)
        return;
    long max = sysconf(_SC_OPEN_MAX);
    for (int fd = 3; fd < (max > 0 ? max : 1024); fd++)
        if (fd != errpipe)
            (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
}

/* Without an image, in a user namespace, the sandbox's host path may cross a directory the
 * container's root may not search (a parent 0700): then it is the cwd already (take_host_trees
 * entered it while we were host root). */
static int sandbox_as_cwd(const struct options *opts)
{
    return errno == EACCES && in_user_namespace && opts->rootfs_lower == NULL &&
           strcmp(opts->cwd, opts->sandbox) == 0;
}

/* A file the kernel cannot execute (ENOEXEC: a script without a #! line) is run by this shell, as
 * POSIX asks of execvp. glibc's execvp does so, musl's does not: the search is ours, the same in
 * either build. */
#define SCRIPT_SHELL "/bin/sh"

/* Executes path; a file the kernel refuses as ENOEXEC goes to SCRIPT_SHELL as its script (if
 * that cannot run either, the file's ENOEXEC is what the caller hears). Returns on failure. */
static void exec_file(const char *path, char **argv, char **env)
{
    size_t argc = 0;
    execve(path, argv, env);
    if (errno != ENOEXEC)
        return;
    while (argv[argc] != NULL)
        argc++;
    char **script_argv = calloc(argc + 2, sizeof *script_argv); /* argv may be long: no VLA */
    if (script_argv != NULL) {
        script_argv[0] = (char *)SCRIPT_SHELL;
        script_argv[1] = (char *)path;
        if (argc > 1)
            memcpy(script_argv + 2, argv + 1, (argc - 1) * sizeof *argv);
        execve(SCRIPT_SHELL, script_argv, env);
        free(script_argv);
    }
    errno = ENOEXEC;
}

/* execvp's search in the workload's environment (never ours): a name with a slash is a path,
 * else each directory of its PATH in turn (an empty one is the cwd). A directory without the
 * file, or one we cannot search, is passed over; EACCES is reported if any directory had the
 * file but refused it, ENOENT if none had it; any other error ends the search with itself. */
static void exec_command(char **argv, char **env)
{
    const char *name = argv[0], *path = DEFAULT_PATH + sizeof "PATH=" - 1;
    char file[PATH_MAX];
    int refused = 0;
    if (strchr(name, '/') != NULL) {
        exec_file(name, argv, env);
        return;
    }
    size_t name_length = strlen(name);
    if (name_length == 0 || name_length > NAME_MAX) {
        errno = name_length == 0 ? ENOENT : ENAMETOOLONG;
        return;
    }
    for (char **variable = env; *variable != NULL; variable++)
        if (strncmp(*variable, "PATH=", 5) == 0) {
            path = *variable + 5; /* the first, as getenv finds it */
            break;
        }
    for (const char *dir = path;; dir++) {
        size_t dir_length = strcspn(dir, ":");
        if (dir_length + 1 + name_length < sizeof file) {
            snprintf(file, sizeof file, "%.*s%s%s", (int)dir_length, dir, dir_length ? "/" : "",
                     name);
            exec_file(file, argv, env);
            if (errno == EACCES)
                refused = 1;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ESTALE && errno != ENODEV &&
                     errno != ETIMEDOUT)
                return;
        }
        dir += dir_length;
        if (*dir == '\0')
            break;
    }
    errno = refused ? EACCES : ENOENT;
}

static void exec_workload(const struct options *opts, int errpipe)
{
    take_terminal(opts, errpipe);
    if (opts->cwd != NULL && chdir(opts->cwd) < 0 && !sandbox_as_cwd(opts))
        child_fail(errpipe, "cwd", opts->cwd, error_text(errno));
    give_sandbox(errpipe, opts, workload_uid(opts), workload_gid(opts));
    if (!opts->privileged && !opts->namespaces)
        drop_bounding_set(errpipe, opts); /* with namespaces the init did, before the fork */
    if (opts->identity_given)
        become(errpipe, opts);
    close_other_fds(errpipe);
    reset_signals();
    confine(errpipe, opts, workload_uid(opts) == 0);
    exec_command(opts->argv, opts->env);
    /* exec mode names the command (a launch's handshake has it already) */
    child_fail(errpipe, "exec", errpipe < 0 ? opts->argv[0] : NULL, error_text(errno));
}

/* --- the container's init (pid 1 of its pid namespace) ----------------------------------- */

static volatile sig_atomic_t workload_pid;
static volatile sig_atomic_t pending_signal; /* arrived before the workload existed */

static void forward_signal(int sig)
{
    if (workload_pid > 0)
        (void)kill((pid_t)workload_pid, sig);
    else
        pending_signal = sig;
}

static void forward_signals(void)
{
    static const int forwarded[] = {SIGHUP, SIGINT,  SIGQUIT, SIGTERM, SIGUSR1,
                                    SIGUSR2, SIGALRM, SIGWINCH, SIGCONT};
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = forward_signal;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        (void)sigaction(forwarded[i], &action, NULL);
}

/* Forks the workload as pid 2, then forwards signals and reaps until the workload ends; its
 * wait status goes to the supervisor through statuspipe. Never returns. */
static void run_init(const struct options *opts, int errpipe, int statuspipe)
{
    int wstatus;
    /* Handlers first: once the supervisor reports the launch, a signal must reach the workload;
     * one that comes before the workload exists is held and sent right after the fork. */
    forward_signals();
    pid_t pid = fork();
    if (pid < 0)
        child_fail(errpipe, "fork", "workload", error_text(errno));
    if (pid == 0) {
        close(statuspipe);
        exec_workload(opts, errpipe); /* resets the handlers before exec */
    }
    workload_pid = pid;
    if (pending_signal != 0)
        (void)kill(pid, pending_signal);
    /* The init keeps no more than a root workload gets (CAP_KILL among them, to forward
     * signals to a workload of another user): nothing in it is worth taking over. */
    if (!opts->privileged && set_capabilities(opts->capabilities, 0) < 0) {
        (void)kill(pid, SIGKILL);
        child_fail(errpipe, "capabilities", "init", error_text(errno));
    }
    close(errpipe); /* the workload's copy alone tells the supervisor whether exec succeeded */
    close(sandbox_fd);
    release_config();
    for (;;) {
        pid_t reaped = waitpid(-1, &wstatus, 0);
        if (reaped == pid)
            break;
        if (reaped < 0 && errno != EINTR)
            _exit(126);
    }
    (void)write_all(statuspipe, (const char *)&wstatus, sizeof wstatus);
    _exit(0);
}

static void run_child(const struct options *opts, int errpipe, int statuspipe)
{
    join_cgroups(errpipe, opts->cgroup_procs); /* first: nothing of ours runs outside them */
    open_stdio(opts, errpipe);
    if (opts->netns != NULL)
        join_netns(errpipe, opts->netns);
    if (!opts->namespaces)
        exec_workload(opts, errpipe);
    if (opts->userns_size > 0)
        clone_into_user_namespace(errpipe, opts);
    else if (namespace_fds[NS_USER] >= 0) {
        join_user_namespace(errpipe, opts);
        if (pid_namespace_in_user_namespace(opts))
            fork_into_pid_namespace(errpipe);
    }
    enter_namespaces(errpipe, opts);
    if (!opts->privileged)
        drop_bounding_set(errpipe, opts); /* the init's too */
    reap_orphans(errpipe, opts);
    run_init(opts, errpipe, statuspipe);
}

/* --- the supervisor ------------------------------------------------------------------------ */

static void ignore_signals(void)
{
    static const int ignored[] = {SIGHUP,  SIGINT,  SIGQUIT, SIGPIPE, SIGTERM, SIGUSR1,
                                  SIGUSR2, SIGALRM, SIGTSTP, SIGTTIN, SIGTTOU, SIGVTALRM,
                                  SIGPROF, SIGXCPU, SIGXFSZ, SIGPOLL};
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++)
        (void)signal(ignored[i], SIG_IGN);
}

/* Opens the status file's directory now, so that a status file that cannot be written fails
 * the launch instead of being lost at exit, and so that the name survives chdir("/"). The
 * file's base name is copied into base (NAME_MAX + 1): the configuration is freed later. */
static int open_status_dir(const char *status_file, char *base)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(status_file, '/');
    const char *name = slash ? slash + 1 : status_file;
    if (*name == '\0' || strlen(name) > NAME_MAX)
        usage_error("--status-file names a directory or is too long:", status_file);
    strcpy(base, name);
    if (slash == NULL)
        snprintf(dir, sizeof dir, ".");
    else if (slash == status_file)
        snprintf(dir, sizeof dir, "/");
    else if ((size_t)(slash - status_file) >= sizeof dir)
        usage_error("--status-file too long:", status_file);
    else
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - status_file), status_file);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        fail("status-file", dir, errno);
    if (faccessat(fd, ".", W_OK, AT_EACCESS) < 0)
        fail("status-file", dir, errno);
    return fd;
}

/* When the child makes the init's pid namespace (pid_namespace_in_user_namespace): the pipe
 * whose other end tells us the init's pid (userns_pid_pipe, written by the child that clones
 * or forks it), and we become a child subreaper so that the init is ours to wait for once that
 * child has left. -1 otherwise. */
static int userns_init_pipe(const struct options *opts)
{
    int ends[2];
    if (!pid_namespace_in_user_namespace(opts))
        return -1;
    if (pipe2(ends, O_CLOEXEC) < 0)
        fail("pipe", NULL, errno);
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        fail("userns", "child subreaper", errno);
    userns_pid_pipe = ends[1];
    return ends[0];
}

/* The init's host pid from the pipe, or the child's when it failed first (its reason follows on
 * the error pipe). */
static pid_t userns_init(int pidpipe, pid_t child)
{
    pid_t init = child;
    size_t got = 0;
    close(userns_pid_pipe);
    while (got < sizeof init) {
        ssize_t n = read(pidpipe, (char *)&init + got, sizeof init - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(pidpipe);
    return got == sizeof init ? init : child;
}

/* Starts the child and returns its pid once it exec'd; on failure, reports and exits. */
static pid_t launch(const struct options *opts, int statuspipe)
{
    int errpipe[2];
    char reason[512];
    ssize_t n;
    size_t got = 0;
    pid_t pid;
    if (pipe2(errpipe, O_CLOEXEC) < 0)
        fail("pipe", NULL, errno);
    int pidpipe = userns_init_pipe(opts);
    open_namespaces(opts);
    choose_pid_namespace(opts);
    pid = fork();
    if (pid < 0)
        fail("fork", NULL, errno);
    if (pid == 0) {
        close(errpipe[0]);
        if (pidpipe >= 0)
            close(pidpipe);
        run_child(opts, errpipe[1], statuspipe);
    }
    close_namespaces();
    close(errpipe[1]);
    pid_t init = pidpipe >= 0 ? userns_init(pidpipe, pid) : pid;
    while ((n = read(errpipe[0], reason + got, sizeof reason - 1 - got)) != 0) {
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            break;
        got += (size_t)n;
        if (got == sizeof reason - 1)
            break;
    }
    close(errpipe[0]);
    if (got == 0 && init != pid) /* the init's parent has left: reap it, the init is ours now */
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
    if (got == 0)
        return init; /* EOF without a word: exec succeeded */
    reason[got] = '\0';
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    char line[600];
    int len = snprintf(line, sizeof line, "error %s\n", reason);
    (void)write_all(STDOUT_FILENO, line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1);
    _exit(1);
}

static int wait_for_exit(pid_t pid, int *wstatus)
{
    while (waitpid(pid, wstatus, 0) < 0)
        if (errno != EINTR)
            return -1;
    return 0;
}

/* Writes the status atomically: temp file, rename. It must outlive the service's crash, not
 * the host's: a power loss ends the container too, and the service's own state is committed
 * without a sync as well (a status file lost or left empty then reads as "no record": LOST).
 * No fsync, which cost ~1 ms on every container's exit path here. */
static int record_status(int dirfd, const char *base, int wstatus, const struct timespec *when)
{
    char tmp[NAME_MAX + 8], body[128];
    int n, fd;
    if (snprintf(tmp, sizeof tmp, "%s.tmp", base) >= (int)sizeof tmp)
        return -1;
    if (WIFSIGNALED(wstatus))
        n = snprintf(body, sizeof body, "signaled %d\n", WTERMSIG(wstatus));
    else
        n = snprintf(body, sizeof body, "exited %d\n", WEXITSTATUS(wstatus));
    n += snprintf(body + n, sizeof body - (size_t)n, "finished %lld.%03ld\n",
                  (long long)when->tv_sec, when->tv_nsec / 1000000L);
    fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    if (write_all(fd, body, (size_t)n) < 0) {
        close(fd);
        return -1;
    }
    if (close(fd) < 0 || renameat(dirfd, tmp, dirfd, base) < 0)
        return -1;
    return 0;
}

/* Guarantees fds 0-2 exist, so no pipe or file of ours lands on them by accident. */
static int open_devnull(void)
{
    int fd;
    do {
        fd = open("/dev/null", O_RDWR);
        if (fd < 0)
            _exit(2);
    } while (fd <= STDERR_FILENO);
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
}

/* The configuration from fd, which is then replaced by /dev/null (or closed). */
static void load_options(int fd, int devnull, struct options *opts)
{
    size_t size;
    char *text = read_config(fd, &size);
    /* Known before parsing, so that even a parse error is told the way of its mode. */
    exec_mode = size >= sizeof "--exec-in" && memcmp(text, "--exec-in", sizeof "--exec-in") == 0;
    if (fd <= STDERR_FILENO)
        (void)dup2(devnull, fd);
    else
        close(fd);
    config_memory.text = text;
    parse_config(text, size, opts);
    if (!opts->privileged) {
        opts->last_capability = read_last_capability();
        if (opts->last_capability < 0)
            fail("capabilities", "/proc/sys/kernel/cap_last_cap", errno ? errno : EINVAL);
    }
}

/* --- exec mode (--exec-in PID): one more process in a running container ------------------- */

/* The container's namespaces in the order they are joined: mnt late, since it moves our root
 * and cwd to the container's root, and its user namespace (when it has one) last, since joining
 * it ends our host privileges, which joining the others (its network namespace is the host's
 * making) needs. The pid namespace applies to our children: hence a fork. */
static const struct {
    const char *name;
    int type;
} exec_namespaces[] = {{"ipc", CLONE_NEWIPC},    {"uts", CLONE_NEWUTS}, {"net", CLONE_NEWNET},
                       {"pid", CLONE_NEWPID},    {"cgroup", CLONE_NEWCGROUP},
                       {"mnt", CLONE_NEWNS},     {"user", CLONE_NEWUSER}};
#define EXEC_NAMESPACES (sizeof exec_namespaces / sizeof exec_namespaces[0])

static unsigned long long exec_number(const char *text, const char *option, unsigned long long max)
{
    char *end, message[64];
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (text[0] < '0' || text[0] > '9' || *end != '\0' || errno != 0 || value == 0 || value > max) {
        snprintf(message, sizeof message, "%s needs a positive number, got", option);
        usage_error(message, text);
    }
    return value;
}

/* Opens the namespaces of the container's init (fds[i] = -1 for a kind it shares with us:
 * joining would change nothing, and for mnt would move our root), then checks that pid is still
 * the process started at `start`: if it is now, it was when the files were opened, so they are
 * its namespaces and not those of a process that got its pid since. */
static void open_target_namespaces(pid_t pid, unsigned long long start, int fds[])
{
    for (size_t i = 0; i < EXEC_NAMESPACES; i++) {
        char theirs[64], ours[64];
        struct stat target, own;
        snprintf(theirs, sizeof theirs, "/proc/%d/ns/%s", (int)pid, exec_namespaces[i].name);
        snprintf(ours, sizeof ours, "/proc/self/ns/%s", exec_namespaces[i].name);
        fds[i] = open(theirs, O_RDONLY | O_CLOEXEC);
        if (fds[i] < 0 || fstat(fds[i], &target) < 0)
            fail("namespace", theirs, errno);
        if (stat(ours, &own) == 0 && own.st_ino == target.st_ino && own.st_dev == target.st_dev) {
            close(fds[i]);
            fds[i] = -1;
        }
    }
    if (start_time(pid) != start)
        fail_because("container", "init", "not running (it ended, or its pid is another's now)");
}

static void join_target_namespaces(const int fds[])
{
    for (size_t i = 0; i < EXEC_NAMESPACES; i++) {
        if (fds[i] < 0)
            continue;
        if (setns(fds[i], exec_namespaces[i].type) < 0)
            fail("setns", exec_namespaces[i].name, errno);
        close(fds[i]);
        if (exec_namespaces[i].type == CLONE_NEWUSER)
            become_namespace_root(-1);
    }
    if (chdir("/") < 0) /* the container's root (ours too if it has no mount namespace) */
        fail("cwd", "/", errno);
}

/* Runs the command inside the container whose init is --exec-in, in its cgroups and namespaces
 * and confined as its workload (the same exec_workload), and returns its exit status, 128 + n
 * for signal n. Its stdin, stdout and stderr are ours. */
/* --- exec with a terminal ------------------------------------------------------------------ */

/* A pty of the container's own devpts (we are in its mount namespace): its name, as the command
 * sees it, is one of the container's /dev/pts, so tty and stty work there. The peer is opened
 * from the master (TIOCGPTPEER), never by a path the container could have replaced. */
/* The container's ptmx: its /dev is the workload's to change, so only the pty multiplexer itself
 * (char 5:2) is taken, opened without blocking; anything else put there is closed unused. */
static int open_ptmx(const char *path)
{
    struct stat info;
    int fd = open(path, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0 && (fstat(fd, &info) < 0 || !S_ISCHR(info.st_mode) ||
                    major(info.st_rdev) != 5 || minor(info.st_rdev) != 2)) {
        close(fd);
        return -1;
    }
    if (fd >= 0)
        (void)fcntl(fd, F_SETFL, 0); /* the relay polls it: blocking reads are fine */
    return fd;
}

static int open_container_terminal(int host_master, int *peer)
{
    int unlock = 0;
    int master = open_ptmx("/dev/pts/ptmx");
    if (master < 0)
        master = open_ptmx("/dev/ptmx");
    if (master < 0) /* a container without a devpts of its own (LXC's): the host's pty */
        master = host_master;
    else if (host_master >= 0)
        close(host_master);
    if (master < 0 || ioctl(master, TIOCSPTLCK, &unlock) < 0)
        fail("tty", "/dev/pts/ptmx", errno);
    *peer = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (*peer < 0)
        fail("tty", "the terminal's peer", errno);
    return master;
}

/* "COLUMNS ROWS\n" lines from the caller's resize pipe become the terminal's window size. */
static void apply_resizes(int resize_fd, int master, char *pending, size_t *length)
{
    ssize_t n = read(resize_fd, pending + *length, 63 - *length);
    if (n <= 0)
        return;
    *length += (size_t)n;
    pending[*length] = '\0';
    char *line = pending, *end;
    while ((end = strchr(line, '\n')) != NULL) {
        unsigned columns, rows;
        *end = '\0';
        if (sscanf(line, "%u %u", &columns, &rows) == 2 && columns > 0 && rows > 0 &&
            columns < 65536 && rows < 65536) {
            struct winsize size = {(unsigned short)rows, (unsigned short)columns, 0, 0};
            (void)ioctl(master, TIOCSWINSZ, &size);
        }
        line = end + 1;
    }
    *length = strlen(line) < 63 ? strlen(line) : 0; /* a line that long is garbage: dropped */
    memmove(pending, line, *length);
}

/* Copies our stdin to the terminal and the terminal to our stdout until the command has ended
 * and its output is drained (EIO: no process holds the terminal any more, or a quiet moment
 * after the exit when something left behind still does). */
static int relay_terminal(int master, int resize_fd, pid_t pid, int *wstatus)
{
    char buffer[16384], pending[64];
    size_t pending_length = 0;
    int exited = 0, stdin_open = 1;
    for (;;) {
        struct pollfd fds[3] = {{master, POLLIN, 0},
                                {stdin_open ? STDIN_FILENO : -1, POLLIN, 0},
                                {resize_fd, POLLIN, 0}};
        int ready = poll(fds, 3, exited ? 50 : 200);
        if (ready < 0 && errno != EINTR)
            return -1;
        if (!exited) {
            pid_t done = waitpid(pid, wstatus, WNOHANG);
            exited = done == pid;
        }
        if (ready <= 0) {
            if (exited)
                return 0;
            continue;
        }
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(master, buffer, sizeof buffer);
            if (n <= 0 && errno != EINTR && errno != EAGAIN) {
                if (!exited && waitpid(pid, wstatus, 0) < 0)
                    return -1;
                return 0;
            }
            if (n > 0 && write_all(STDOUT_FILENO, buffer, (size_t)n) < 0)
                return -1; /* the caller is gone */
        }
        if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(STDIN_FILENO, buffer, sizeof buffer);
            if (n > 0)
                (void)write_all(master, buffer, (size_t)n);
            else if (n == 0 || errno != EINTR)
                stdin_open = 0; /* end of input; a terminal says it with ^D, the caller's to send */
        }
        if (resize_fd >= 0 && (fds[2].revents & POLLIN))
            apply_resizes(resize_fd, master, pending, &pending_length);
    }
}

static int run_exec(struct options *opts, int devnull)
{
    int fds[EXEC_NAMESPACES], wstatus;
    if (opts->exec_report_fd != NULL) {
        exec_report_fd = (int)exec_number(opts->exec_report_fd, "--exec-report-fd", INT_MAX);
        /* The command must not inherit it: only we (and our child until its exec) write it. */
        if (exec_report_fd <= STDERR_FILENO || fcntl(exec_report_fd, F_SETFD, FD_CLOEXEC) < 0)
            usage_error("--exec-report-fd needs an open descriptor above 2, got",
                        opts->exec_report_fd);
    }
    pid_t target = (pid_t)exec_number(opts->exec_in, "--exec-in", INT_MAX);
    open_target_namespaces(target, exec_number(opts->exec_start_time, "--exec-start-time",
                                               ULLONG_MAX), fds);
    join_cgroups(-1, opts->cgroup_procs); /* host paths: before the mount namespace changes */
    /* Until the command's exec, the child holds every capability among the container's
     * processes: not dumpable, so none of them may open its /proc files (fds, memory). */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        fail("dumpable", NULL, errno);
    /* Opened while we still see the host's /dev: the fallback for a container with no devpts. */
    int host_master = opts->tty ? open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC) : -1;
    join_target_namespaces(fds);
    /* It creates no namespace: as a workload without any, it cuts its own bounding set. */
    opts->namespaces = 0;
    forward_signals(); /* the init's set: a signal meant for the command reaches it */
    int peer = -1, master = opts->tty ? open_container_terminal(host_master, &peer) : -1;
    int resize_fd = -1;
    if (opts->resize_fd != NULL) {
        resize_fd = (int)exec_number(opts->resize_fd, "--resize-fd", INT_MAX);
        if (resize_fd <= STDERR_FILENO || fcntl(resize_fd, F_SETFD, FD_CLOEXEC) < 0)
            usage_error("--resize-fd needs an open descriptor above 2, got", opts->resize_fd);
    }
    pid_t pid = fork();
    if (pid < 0)
        fail("fork", NULL, errno);
    if (pid == 0) {
        /* A session of its own whose controlling terminal is the container's pty (job
         * control, ^C as SIGINT, window size). */
        if (master >= 0 && (setsid() < 0 || dup2(peer, STDIN_FILENO) < 0 ||
                            dup2(peer, STDOUT_FILENO) < 0 || dup2(peer, STDERR_FILENO) < 0 ||
                            ioctl(STDIN_FILENO, TIOCSCTTY, 0) < 0))
            child_fail(-1, "tty", "controlling terminal", error_text(errno));
        exec_workload(opts, -1); /* errors straight to stderr: nobody reads a pipe */
    }
    if (peer >= 0)
        close(peer); /* the command's copies alone keep the terminal open */
    workload_pid = pid;
    if (pending_signal != 0)
        (void)kill(pid, pending_signal);
    /* Inside the container we keep no more than a root workload gets, like its init. */
    if (!opts->privileged && set_capabilities(opts->capabilities, 0) < 0) {
        (void)kill(pid, SIGKILL);
        fail("capabilities", "exec", errno);
    }
    release_config();
    if (master >= 0) {
        if (relay_terminal(master, resize_fd, pid, &wstatus) < 0)
            return EXEC_CANNOT_RUN;
        return WIFSIGNALED(wstatus) ? 128 + WTERMSIG(wstatus) : WEXITSTATUS(wstatus);
    }
    /* The command's output ends when the command and what it started close it, not with us. */
    for (int fd = STDIN_FILENO; fd <= STDERR_FILENO; fd++)
        (void)dup2(devnull, fd);
    while (waitpid(pid, &wstatus, 0) < 0)
        if (errno != EINTR)
            return EXEC_CANNOT_RUN;
    return WIFSIGNALED(wstatus) ? 128 + WTERMSIG(wstatus) : WEXITSTATUS(wstatus);
}

int main(int argc, char **argv)
{
    struct options opts;
    char base[NAME_MAX + 1], line[128];
    int wstatus, len;
    struct timespec finished;
    pid_t pid;

    int devnull = open_devnull();
    ignore_signals();
    if (is_log_relay(argc, argv))
        return run_log_relay(argc, argv);
    if (is_sandbox_relay(argc, argv))
        return run_sandbox_relay(argc, argv);
    load_options(config_fd_of(argc, argv), devnull, &opts);
    if (exec_mode)
        return run_exec(&opts, devnull);
    int dirfd = open_status_dir(opts.status_file, base);
    if (opts.log_file != NULL)
        prepare_cri_log(opts.log_file);
    else if (output_piped(&opts))
        prepare_sandbox_outputs(&opts);
    attach_prepare(&opts);
    int statuspipe[2];
    if (pipe2(statuspipe, O_CLOEXEC) < 0)
        fail("pipe", NULL, errno);
    pid = launch(&opts, statuspipe[1]);
    close(statuspipe[1]);
    close_log_write_ends();
    attach_close_child_ends();
    release_config();

    len = snprintf(line, sizeof line, "ok %d %llu %llu\n", (int)pid, start_time(pid),
                   start_time(getpid()));
    if (write_all(STDOUT_FILENO, line, (size_t)len) < 0) {
        /* Nobody heard of this container, so nobody would ever stop it: do not leave it. */
        kill(pid, SIGKILL);
    }
    /* Detach from whatever the service gave us; never touch a terminal again. */
    (void)dup2(devnull, STDIN_FILENO);
    (void)dup2(devnull, STDOUT_FILENO);
    (void)dup2(devnull, STDERR_FILENO);
    close(devnull);
    (void)chdir("/");

    if ((output_through_supervisor() ? copy_logs_until_exit(pid, &wstatus)
                                     : wait_for_exit(pid, &wstatus)) < 0)
        return 3;
    clock_gettime(CLOCK_REALTIME, &finished);
    /* With namespaces the child is our init: the workload's own status comes through the pipe.
     * No word there means the init itself was killed (destroy): its status is the answer. */
    int workload_status;
    if (read(statuspipe[0], &workload_status, sizeof workload_status) ==
        (ssize_t)sizeof workload_status)
        wstatus = workload_status;
    return record_status(dirfd, base, wstatus, &finished) == 0 ? 0 : 4;
}
