/*
 * containerizer-du: the bytes directory trees hold on disk, for the disk isolator's disk/du
 * (isolators/disk/du.py). It counts what `du -s -x -B1 -- ROOT...` counts and prints the sum, in
 * one line, with less work than du's walk (gnulib fts): no allocation per entry, entries counted
 * in the order the directory lists them as they are read, a directory opened and counted by one
 * open and an fstat (not a stat, an open and an fstat), and the exec of a small static binary.
 *
 * Usage:
 *   containerizer-du [--] ROOT...
 *
 * What is counted, as du counts it:
 *   - allocated bytes (st_blocks * 512): a sparse file counts what it holds, not its length;
 *   - every entry once: a file with several hard links (and a directory reached twice, by two
 *     roots that overlap) is counted the first time only, across all the roots;
 *   - a symlink is counted itself and never followed, a root that is one included;
 *   - no other filesystem: an entry whose device is not its root's is neither counted nor
 *     entered (a mount point, a bind-mounted file);
 *   - a root that does not exist counts nothing.
 * Only hard-linked files and directories are recorded to be counted once: a file of one link met
 * twice (bind-mounted in the tree on its own filesystem, which only the host can do) counts twice,
 * as in du given one root (du given several records every entry, a cost on every file).
 *
 * The trees belong to a workload that keeps running while they are measured; the roots are the
 * service's. So no path below a root is ever resolved: every entry is reached by its name
 * relative to its directory's descriptor, and a directory is entered only through
 * openat(parent, name, O_DIRECTORY | O_NOFOLLOW): an entry swapped for a symlink is not followed
 * (it counts as what it has become), one swapped for a FIFO is never opened (O_DIRECTORY refuses
 * it before any open), and the directory counted is the one read, through the same descriptor.
 *
 * No depth limit, bounded descriptors: a tree can be far deeper than the descriptor limit, so only
 * the root's and the KEEP_OPEN deepest directories' descriptors stay open. Climbing back to a
 * directory whose descriptor was closed opens ".." of its child and accepts it only if its device
 * and inode are the ones recorded on the way down (as gnulib's fts does for du); a directory moved
 * meanwhile fails that check, and the walk gives up everything between it and the nearest
 * directory still open, rather than follow a path the workload chose.
 *
 * Output: the total on stdout. Exit status 0; 1 when some entries could not be read (gone since
 * the listing, swapped, a failed read): what could be read is counted, as du does; 2 on a failure
 * (usage, memory), with no total. Error messages never carry a name from the trees.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { EXIT_COUNTED = 0, EXIT_SOME_UNREADABLE = 1, EXIT_FAILED = 2 };

/* Descriptors of the deepest directories kept open (beyond them the walk climbs with ".."). */
#define KEEP_OPEN 64
/* One getdents64 call's buffer: a directory of a few thousand entries in one or two calls. */
#define LISTING_BYTES (256 * 1024)
#define DIRECTORY_FLAGS (O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY)

struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* A directory on the current path: its identity, checked when it is reopened through "..". */
struct level {
    dev_t dev;
    ino_t ino;
    int fd; /* -1 once closed to bound the descriptors */
    size_t first_pending; /* its subdirectories still to enter: pending[first_pending..] */
};

/* The names of subdirectories listed but not yet entered, a stack for every level at once. */
struct pending {
    char *names; /* NUL-terminated, one after another */
    size_t names_used, names_capacity;
    size_t *offsets; /* where each name starts */
    size_t count, capacity;
};

/* The (device, inode) pairs counted that could be met again: open addressing, never shrinks. */
struct identity {
    uint64_t dev, ino;
};
struct seen {
    struct identity *slots;
    unsigned char *used;
    size_t capacity, count;
};

struct walk {
    dev_t root_dev;
    unsigned long long total;
    int unreadable;
    struct level *levels;
    size_t depth, levels_capacity;
    struct pending pending;
    struct seen seen;
    char *listing;
};

static void out_of_memory(void) {
    fputs("containerizer-du: out of memory\n", stderr);
    exit(EXIT_FAILED);
}

static void *grow(void *items, size_t *capacity, size_t item_size, size_t needed) {
    if (needed <= *capacity)
        return items;
    size_t larger = *capacity ? *capacity : 64;
    while (larger < needed)
        larger *= 2;
    void *moved = realloc(items, larger * item_size);
    if (!moved)
        out_of_memory();
    *capacity = larger;
    return moved;
}

/* --- entries counted once --------------------------------------------------------------------- */

static size_t slot_of(const struct seen *seen, struct identity key) {
    uint64_t hash = key.ino * 0x9E3779B97F4A7C15ull ^ key.dev * 0xC2B2AE3D27D4EB4Full;
    hash ^= hash >> 29;
    size_t slot = hash & (seen->capacity - 1);
    while (seen->used[slot] && (seen->slots[slot].ino != key.ino || seen->slots[slot].dev != key.dev))
        slot = (slot + 1) & (seen->capacity - 1);
    return slot;
}

static void rehash(struct seen *seen) {
    struct seen larger = {0};
    larger.capacity = seen->capacity ? seen->capacity * 2 : 1024;
    larger.slots = malloc(larger.capacity * sizeof *larger.slots);
    larger.used = calloc(larger.capacity, 1);
    if (!larger.slots || !larger.used)
        out_of_memory();
    for (size_t index = 0; index < seen->capacity; index++) {
        if (!seen->used[index])
            continue;
        size_t slot = slot_of(&larger, seen->slots[index]);
        larger.slots[slot] = seen->slots[index];
        larger.used[slot] = 1;
        larger.count++;
    }
    free(seen->slots);
    free(seen->used);
    *seen = larger;
}

/* True the first time an entry is met: it is then recorded. */
static int first_visit(struct seen *seen, dev_t dev, ino_t ino) {
    if ((seen->count + 1) * 2 > seen->capacity)
        rehash(seen);
    struct identity key = {(uint64_t)dev, (uint64_t)ino};
    size_t slot = slot_of(seen, key);
    if (seen->used[slot])
        return 0;
    seen->slots[slot] = key;
    seen->used[slot] = 1;
    seen->count++;
    return 1;
}

/* --- subdirectories still to enter ------------------------------------------------------------ */

static void push_pending(struct pending *pending, const char *name) {
    size_t length = strlen(name) + 1;
    pending->names = grow(pending->names, &pending->names_capacity, 1, pending->names_used + length);
    pending->offsets =
        grow(pending->offsets, &pending->capacity, sizeof *pending->offsets, pending->count + 1);
    memcpy(pending->names + pending->names_used, name, length);
    pending->offsets[pending->count++] = pending->names_used;
    pending->names_used += length;
}

/* The last name pushed, removed: it stays readable until the next push. */
static const char *pop_pending(struct pending *pending) {
    size_t offset = pending->offsets[--pending->count];
    pending->names_used = offset;
    return pending->names + offset;
}

static void drop_pending(struct pending *pending, size_t keep) {
    if (keep < pending->count) {
        pending->names_used = pending->offsets[keep];
        pending->count = keep;
    }
}

/* --- counting ---------------------------------------------------------------------------------- */

/* Adds an entry's own blocks, unless it is on another filesystem or was met before (a hard link
 * or a directory: the only entries that can be). 1 if added. */
static int add(struct walk *walk, const struct stat *status) {
    if (status->st_dev != walk->root_dev)
        return 0; /* not counted, as du -x */
    if ((S_ISDIR(status->st_mode) || status->st_nlink > 1) &&
        !first_visit(&walk->seen, status->st_dev, status->st_ino))
        return 0;
    walk->total += (unsigned long long)status->st_blocks * 512;
    return 1;
}

enum directory_found { ENTER_LATER, NOT_ENTERED };

/* An entry counted by its own status, a symlink not followed. A directory (one the listing did
 * not call so: a file system without d_type, a swap) is put aside to be entered like the others;
 * or, when it could not be entered just before, counted itself and its contents said unread. */
static void count_entry(struct walk *walk, int directory_fd, const char *name,
                        enum directory_found directory) {
    struct stat status;
    if (fstatat(directory_fd, name, &status, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT) != 0) {
        walk->unreadable = 1; /* gone since the listing */
        return;
    }
    if (!S_ISDIR(status.st_mode)) {
        add(walk, &status);
    } else if (directory == ENTER_LATER) {
        push_pending(&walk->pending, name);
    } else {
        walk->unreadable = 1;
        add(walk, &status);
    }
}

/* Counts one getdents64 chunk: directories are put aside to be entered once the listing ends. */
static void count_listed(struct walk *walk, int directory_fd, const char *chunk, long length) {
    for (long offset = 0; offset < length;) {
        const struct linux_dirent64 *entry = (const void *)(chunk + offset);
        offset += entry->d_reclen;
        const char *name = entry->d_name;
        if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0')))
            continue;
        if (entry->d_type == DT_DIR)
            push_pending(&walk->pending, name);
        else
            count_entry(walk, directory_fd, name, ENTER_LATER);
    }
}

static void count_directory_entries(struct walk *walk, int directory_fd) {
    for (;;) {
        long length = syscall(SYS_getdents64, directory_fd, walk->listing, LISTING_BYTES);
        if (length == 0)
            return;
        if (length < 0) {
            walk->unreadable = 1; /* what was listed before the failure still counts */
            return;
        }
        count_listed(walk, directory_fd, walk->listing, length);
    }
}

/* --- the path from the root -------------------------------------------------------------------- */

/* Makes an open directory the deepest level and counts what it lists. Only the root's and the
 * KEEP_OPEN deepest levels keep their descriptors. */
static void descend(struct walk *walk, int fd, const struct stat *status) {
    walk->levels = grow(walk->levels, &walk->levels_capacity, sizeof *walk->levels, walk->depth + 1);
    walk->levels[walk->depth] =
        (struct level){status->st_dev, status->st_ino, fd, walk->pending.count};
    walk->depth++;
    if (walk->depth > KEEP_OPEN + 1) {
        struct level *oldest = &walk->levels[walk->depth - 1 - KEEP_OPEN];
        close(oldest->fd);
        oldest->fd = -1;
    }
    count_directory_entries(walk, fd);
}

/* Enters the subdirectory `name` of the deepest level: counted through the descriptor it is read
 * by. Not one any more (swapped for a symlink or a file): counted as what it is; one that cannot
 * be opened (gone, or not to be read): what is left of it is counted, as du does. */
static void enter(struct walk *walk, const char *name) {
    int parent_fd = walk->levels[walk->depth - 1].fd;
    int fd = openat(parent_fd, name, DIRECTORY_FLAGS);
    if (fd < 0) {
        count_entry(walk, parent_fd, name, NOT_ENTERED);
        return;
    }
    struct stat status;
    if (fstat(fd, &status) != 0) {
        walk->unreadable = 1;
        close(fd);
    } else if (add(walk, &status)) {
        descend(walk, fd, &status);
    } else {
        close(fd); /* another filesystem, or entered before */
    }
}

/* Reopens a closed level through ".." of its child: 1 if it is still the directory recorded. */
static int reopen_through_parent_link(struct level *closed, int child_fd) {
    int fd = openat(child_fd, "..", DIRECTORY_FLAGS);
    struct stat status;
    if (fd >= 0 && fstat(fd, &status) == 0 && status.st_dev == closed->dev &&
        status.st_ino == closed->ino) {
        closed->fd = fd;
        return 1;
    }
    if (fd >= 0)
        close(fd);
    return 0;
}

/* Leaves the deepest level for its parent. A parent that cannot be reopened as itself (the
 * workload moved a directory) is given up with every level up to the nearest one still open. */
static void climb(struct walk *walk) {
    struct level *child = &walk->levels[--walk->depth];
    drop_pending(&walk->pending, child->first_pending);
    if (walk->depth > 0 && walk->levels[walk->depth - 1].fd < 0 &&
        !reopen_through_parent_link(&walk->levels[walk->depth - 1], child->fd)) {
        walk->unreadable = 1;
        while (walk->depth > 0 && walk->levels[walk->depth - 1].fd < 0)
            drop_pending(&walk->pending, walk->levels[--walk->depth].first_pending);
    }
    close(child->fd);
}

/* --- roots -------------------------------------------------------------------------------------- */

/* A root that could not be opened as a directory (a file, a symlink, or not to be read): counted
 * itself, a directory's contents said unread. */
static void count_root_entry(struct walk *walk, const char *root) {
    struct stat status;
    if (fstatat(AT_FDCWD, root, &status, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT) != 0) {
        walk->unreadable |= errno != ENOENT;
        return;
    }
    walk->root_dev = status.st_dev;
    walk->unreadable |= S_ISDIR(status.st_mode); /* a directory again: its contents unread */
    add(walk, &status);
}

static void count_root(struct walk *walk, const char *root) {
    int fd = open(root, DIRECTORY_FLAGS);
    if (fd < 0) {
        if (errno != ENOENT) /* not a directory (a file, a symlink), or not to be read */
            count_root_entry(walk, root);
        return; /* a missing root counts nothing */
    }
    struct stat status;
    if (fstat(fd, &status) != 0) {
        walk->unreadable = 1;
        close(fd);
        return;
    }
    walk->root_dev = status.st_dev;
    if (!add(walk, &status)) {
        close(fd); /* the same directory given twice, or inside a root already walked */
        return;
    }
    descend(walk, fd, &status);
    while (walk->depth > 0) {
        struct level *deepest = &walk->levels[walk->depth - 1];
        if (walk->pending.count > deepest->first_pending)
            enter(walk, pop_pending(&walk->pending));
        else
            climb(walk);
    }
}

int main(int argc, char **argv) {
    int first = argc > 1 && strcmp(argv[1], "--") == 0 ? 2 : 1;
    for (int index = first; index < argc; index++) {
        if (first == 1 && argv[index][0] == '-') {
            fputs("usage: containerizer-du [--] ROOT...\n", stderr);
            return EXIT_FAILED;
        }
    }
    struct walk walk = {0};
    walk.listing = malloc(LISTING_BYTES);
    if (!walk.listing)
        out_of_memory();
    for (int index = first; index < argc; index++)
        count_root(&walk, argv[index]);
    if (printf("%llu\n", walk.total) < 0 || fflush(stdout) != 0)
        return EXIT_FAILED;
    return walk.unreadable ? EXIT_SOME_UNREADABLE : EXIT_COUNTED;
}
